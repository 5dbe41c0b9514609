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

# shellcheck source=../lib/cache.sh
source "$here/../lib/cache.sh"
bin_dir="$cache_root/k8s/$K8S_VERSION/bin"
stamp_dir="$bin_dir" log_tag="build.sh"
for arg in "$@"; do
  case "$arg" in
    --print-bin-dir) echo "$bin_dir"; exit 0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

use_go
mkdir -p "$bin_dir"
lock_builds "$cache_root/k8s/.build.lock"

# The committed modules must match versions.env.
grep -q "^require k8s.io/kubernetes ${K8S_VERSION}\$" "$here/kube/go.mod" \
  || { echo "build.sh: hack/k8s/kube/go.mod is not at ${K8S_VERSION}: run hack/k8s/gen-modules.sh" >&2; exit 1; }
grep -q "^require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}\$" "$here/etcd/go.mod" \
  || { echo "build.sh: hack/k8s/etcd/go.mod is not at ${ETCD_VERSION}: run hack/k8s/gen-modules.sh" >&2; exit 1; }

stamp_key() { # build-function files...: what decides a part's bytes
  local fn="$1"; shift
  { cat "$here/versions.env"; echo "$go_version $CGO_ENABLED $GOFLAGS"; declare -f "$fn"
    for f in "$@"; do cat "$f"; done; } | hash_key
}
# Until 2026-11 a stamp hashed this whole script (the blob below) instead of
# the build function, so any edit of it rebuilt everything. A stamp that
# script would still accept for today's inputs is accepted as it is (and kept,
# so checkouts still running the old script agree); without git or that blob
# it is not, and the part is rebuilt.
old_stamp_key() { # files...
  { cat "$here/versions.env"
    git -C "$here" cat-file blob 6e0aeb91a5d566b8fc972888bc669d685f751101 2>/dev/null || echo none
    echo "$go_version"; for f in "$@"; do cat "$f"; done; } | hash_key
}
part() { # part build-function binaries... [-- files the stamp covers...]
  local name="$1" fn="$2"; shift 2
  local bins=() files=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
  if [ $# -gt 0 ]; then shift; fi
  files=("$@")
  local key; key="$(old_stamp_key "${files[@]}")"
  [ "$(cat "$stamp_dir/.stamp-$name" 2>/dev/null)" = "$key" ] || key="$(stamp_key "$fn" "${files[@]}")"
  timed "$name" "$key" "${bins[@]}" -- "$fn"
}

# --- etcd (separate module: its go.mod has replace directives)
build_etcd() {
  (cd "$here/etcd" && go build -o "$bin_dir/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv -f "$bin_dir/etcd.tmp" "$bin_dir/etcd"
}
part etcd build_etcd etcd -- "$here/etcd/go.mod" "$here/etcd/go.sum"

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
part kube build_kube kube-apiserver kube-controller-manager kube-scheduler kubectl \
  -- "$here/kube/go.mod" "$here/kube/go.sum"

# --- helm: go install works (no replace directives).
build_helm() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${minor}"
  done
  GOBIN="$bin_dir" go install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
}
part helm build_helm helm

echo "[build.sh] all binaries in $bin_dir ($(elapsed))"
