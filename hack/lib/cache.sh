# shellcheck shell=bash
# Shared by the scripts that build into ${PATIO_CACHE_DIR:-$HOME/.cache/patio}
# (hack/k8s/build.sh, hack/node/build.sh): find Go, take the cache's build lock,
# and build a part only when its stamp does not match.
#
# A part's stamp is a key the calling script computes from what decides the
# part's bytes (versions, the Go version, the shell functions that build it,
# its source files); `timed` writes it after a successful build into
# $stamp_dir/.stamp-<part>. Set before calling: stamp_dir, log_tag, and
# force=1 to rebuild regardless.

cache_root="${PATIO_CACHE_DIR:-${HOME:-/root}/.cache/patio}"
force="${force:-0}"

use_go() { # put a Go toolchain on PATH, or exit naming what is missing
  if ! command -v go >/dev/null 2>&1; then
    for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do
      if [ -x "$g" ]; then PATH="$(dirname "$g"):$PATH"; break; fi
    done
  fi
  command -v go >/dev/null 2>&1 || { echo "build.sh: no Go toolchain found (need go >= 1.26)" >&2; exit 1; }
  export CGO_ENABLED=0
  # -buildvcs=false: we build from the module cache, not from a checkout.
  export GOFLAGS="-trimpath -buildvcs=false"
  go_version="$(go env GOVERSION)"
}

lock_builds() { # lock-file: one build at a time per cache (two test runs may start together)
  exec 9>"$1"
  flock 9
}

hash_key() { sha256sum | cut -c1-16; }

is_built() { # part key files...: the stamp matches and every file (under stamp_dir) is there
  local part="$1" key="$2"; shift 2
  [ "$force" = 0 ] || return 1
  [ "$(cat "$stamp_dir/.stamp-$part" 2>/dev/null)" = "$key" ] || return 1
  for f in "$@"; do [ -s "$stamp_dir/$f" ] || return 1; done
}

build_start=$(date +%s)
timed() { # part key files... -- command...: build the part unless it is up to date
  local part="$1" key="$2"; shift 2
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  shift
  if is_built "$part" "$key" "${files[@]}"; then
    echo "[$log_tag] $part: up to date (${files[*]})"
    return 0
  fi
  echo "[$log_tag] $part: building ${files[*]} ..."
  local t0; t0=$(date +%s)
  rm -f "$stamp_dir/.stamp-$part"
  "$@"
  echo "$key" >"$stamp_dir/.stamp-$part"
  echo "[$log_tag] $part: built in $(( $(date +%s) - t0 ))s"
}

elapsed() { echo "$(( $(date +%s) - build_start ))s"; }
