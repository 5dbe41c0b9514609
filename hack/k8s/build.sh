#!/usr/bin/env bash
# Build the real Kubernetes control plane used by the test suite (tests/kube):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm,
# from the Go module proxy, into a cache folder outside the repository:
#
#   ${PATIO_CACHE_DIR:-$HOME/.cache/patio}/k8s/<K8S_VERSION>/bin/
#
# so that another clone on the same machine reuses it. Whatever is already
# built for the same inputs (versions.env, the module's go.sum, the Go version)
# is skipped, so a warm run takes well under a second.
#
#   hack/k8s/build.sh            build what is missing
#   hack/k8s/build.sh --print-bin-dir
#   hack/k8s/build.sh --force    rebuild everything
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${PATIO_CACHE_DIR:-${HOME:-/root}/.cache/patio}"
bin_dir="$cache_root/k8s/$K8S_VERSION/bin"
force=0
for arg in "$@"; do
  case "$arg" in
    --print-bin-dir) echo "$bin_dir"; exit 0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if ! command -v go >/dev/null 2>&1; then
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    if [ -x "$g" ]; then PATH="$(dirname "$g"):$PATH"; break; fi
  done
fi
command -v go >/dev/null 2>&1 || { echo "build.sh: no Go toolchain found (need go >= 1.26)" >&2; exit 1; }

mkdir -p "$bin_dir"
# One build at a time per cache (two test runs may start together).
exec 9>"$cache_root/k8s/.build.lock"
flock 9
export CGO_ENABLED=0
# -buildvcs=false: we build from the module cache, not from a checkout.
export GOFLAGS="-trimpath -buildvcs=false"
go_version="$(go env GOVERSION)"

# The committed modules must match versions.env.
grep -q "^require k8s.io/kubernetes ${K8S_VERSION}\$" "$here/kube/go.mod" \
  || { echo "build.sh: hack/k8s/kube/go.mod is not at ${K8S_VERSION}: run hack/k8s/gen-modules.sh" >&2; exit 1; }
grep -q "^require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}\$" "$here/etcd/go.mod" \
  || { echo "build.sh: hack/k8s/etcd/go.mod is not at ${ETCD_VERSION}: run hack/k8s/gen-modules.sh" >&2; exit 1; }

stamp_key() { # inputs that decide a component's bytes (this script holds the flags)
  { cat "$here/versions.env" "$here/build.sh"; echo "$go_version"; for f in "$@"; do cat "$f"; done; } \
    | sha256sum | cut -c1-16
}
is_built() { # name key binaries...
  local name="$1" key="$2"; shift 2
  [ "$force" = 0 ] || return 1
  [ "$(cat "$bin_dir/.stamp-$name" 2>/dev/null)" = "$key" ] || return 1
  for b in "$@"; do [ -x "$bin_dir/$b" ] || return 1; done
}
total_start=$(date +%s)
timed() { # name key binaries... -- command...
  local name="$1" key="$2"; shift 2
  local bins=()
  while [ "$1" != "--" ]; do bins+=("$1"); shift; done
  shift
  if is_built "$name" "$key" "${bins[@]}"; then
    echo "[build.sh] $name: up to date (${bins[*]})"
    return 0
  fi
  echo "[build.sh] $name: building ${bins[*]} ..."
  local t0; t0=$(date +%s)
  rm -f "$bin_dir/.stamp-$name"
  "$@"
  echo "$key" >"$bin_dir/.stamp-$name"
  echo "[build.sh] $name: built in $(( $(date +%s) - t0 ))s"
}

# --- etcd (separate module: its go.mod has replace directives)
build_etcd() {
  (cd "$here/etcd" && go build -o "$bin_dir/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv -f "$bin_dir/etcd.tmp" "$bin_dir/etcd"
}
timed etcd "$(stamp_key "$here/etcd/go.mod" "$here/etcd/go.sum")" etcd -- build_etcd

# --- Kubernetes: all binaries in ONE go build so they share compilation.
build_kube() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=${K8S_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
    ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z -X $pkg.gitCommit="
  done
  local tmp="$bin_dir/.kube.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$here/kube" && go build -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl)
  mv -f "$tmp"/* "$bin_dir/"
  rmdir "$tmp"
}
timed kube "$(stamp_key "$here/kube/go.mod" "$here/kube/go.sum")" \
  kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_kube

# --- helm: go install works (no replace directives).
build_helm() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${minor}"
  done
  GOBIN="$bin_dir" go install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
}
timed helm "$(stamp_key)" helm -- build_helm

echo "[build.sh] all binaries in $bin_dir ($(( $(date +%s) - total_start ))s)"
