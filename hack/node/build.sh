#!/usr/bin/env bash
# Build the real test node (tests/realnode): containerd 2.x with its runc shim
# and ctr, the CNI plugins it needs, crictl, kubelet and kube-proxy, and the two
# images a node needs that no registry can give us here: pause (the pod
# sandbox, hack/node/pause) and CoreDNS. Everything comes from the Go module
# proxy; runc, iptables and conntrack are Debian's.
#
#   ${PATIO_CACHE_DIR:-$HOME/.cache/patio}/node/<K8S_VERSION>/bin/      binaries
#   ${PATIO_CACHE_DIR:-$HOME/.cache/patio}/node/<K8S_VERSION>/images/   OCI archives
#
# Each part has a stamp (hash of the versions, the Go version, the shell
# functions that build it and its source files) and is skipped when it
# matches, like hack/k8s/build.sh; builds take a flock.
#
#   hack/node/build.sh               build what is missing
#   hack/node/build.sh --print-dir   the folder holding bin/ and images/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s="$(cd "$here/../k8s" && pwd)"
# shellcheck source=../k8s/versions.env
source "$k8s/versions.env"
# shellcheck source=versions.env
source "$here/versions.env"

# shellcheck source=../lib/cache.sh
source "$here/../lib/cache.sh"
out="$cache_root/node/$K8S_VERSION"
bin_dir="$out/bin"
img_dir="$out/images"
stamp_dir="$out" log_tag="node"
case "${1:-}" in
  --print-dir) echo "$out"; exit 0 ;;
  "") ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
esac

use_go
command -v buildah >/dev/null 2>&1 || { echo "build.sh: buildah is missing (apt-get install buildah)" >&2; exit 1; }

mkdir -p "$bin_dir" "$img_dir"
lock_builds "$out/.build.lock"

stamp_key() { # build-function files...: what decides a part's bytes
  local fn="$1"; shift
  { cat "$k8s/versions.env" "$here/versions.env"; echo "$go_version"
    declare -f gobin bh image_from_binary "$fn"
    for f in "$@"; do cat "$f"; done; } | hash_key
}
gobin() { GOBIN="$bin_dir" nice go install -ldflags "-s -w $1" "${@:2}"; }
# --- images: a static binary on an empty base, committed with buildah into a
# store of this cache and written as an OCI archive for `ctr images import`.
# Its network settings too: buildah writes a CNI lock under its config folder
# (/etc/cni/net.d by default) even with --network host.
mkdir -p "$out/cni" && printf '[network]\nnetwork_config_dir = "%s"\n' "$out/cni" >"$out/containers.conf"
bh() { CONTAINERS_CONF="$out/containers.conf" nice buildah --root "$out/buildah" --runroot "$out/buildah-run" --storage-driver vfs "$@"; }
image_from_binary() { # name tag binary user entrypoint-args...
  local name="$1" tag="$2" binary="$3" user="$4"; shift 4
  local c; c="$(bh from scratch)"
  bh copy --quiet "$c" "$binary" "/$(basename "$binary")" >/dev/null
  local ep; ep="$(printf '"%s",' "/$(basename "$binary")" "$@")"
  bh config --user "$user" --entrypoint "[${ep%,}]" --cmd '' "$c"
  bh commit --rm --quiet "$c" "localhost/patio/$name:$tag" >/dev/null
  rm -f "$img_dir/$name.tar"
  bh push --quiet "localhost/patio/$name:$tag" "oci-archive:$img_dir/$name.tar:localhost/patio/$name:$tag"
  bh rmi "localhost/patio/$name:$tag" >/dev/null
}

# --- kubelet and kube-proxy: the control plane's module (hack/k8s/kube), so
# they share its Go build cache. Version ldflags as hack/k8s/build.sh sets them.
build_kube() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=${K8S_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
    ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z -X $pkg.gitCommit="
  done
  (cd "$k8s/kube" && nice go build -ldflags "$ld" -o "$bin_dir/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
}
timed kube "$(stamp_key build_kube "$k8s/kube/go.mod" "$k8s/kube/go.sum")" bin/kubelet bin/kube-proxy -- build_kube

# --- containerd, its runc shim (runc itself is Debian's) and ctr (imports).
# No cgo: the btrfs and devmapper snapshotters need it and are not used.
build_containerd() {
  local v="github.com/containerd/containerd/v2/version"
  GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" gobin \
    "-X $v.Version=${CONTAINERD_VERSION} -X $v.Package=github.com/containerd/containerd/v2" \
    "github.com/containerd/containerd/v2/cmd/containerd@${CONTAINERD_VERSION}" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@${CONTAINERD_VERSION}" \
    "github.com/containerd/containerd/v2/cmd/ctr@${CONTAINERD_VERSION}"
}
timed containerd "$(stamp_key build_containerd)" bin/containerd bin/containerd-shim-runc-v2 bin/ctr -- build_containerd

# --- CNI plugins, in a folder of their own (containerd's bin_dirs).
build_cni() {
  local p="github.com/containernetworking/plugins"
  GOBIN="$bin_dir/cni" nice go install -ldflags "-s -w" \
    "$p/plugins/main/bridge@${CNI_PLUGINS_VERSION}" "$p/plugins/main/loopback@${CNI_PLUGINS_VERSION}" \
    "$p/plugins/ipam/host-local@${CNI_PLUGINS_VERSION}" "$p/plugins/meta/portmap@${CNI_PLUGINS_VERSION}"
}
timed cni "$(stamp_key build_cni)" bin/cni/bridge bin/cni/loopback bin/cni/host-local bin/cni/portmap -- build_cni

build_crictl() {
  gobin "-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION}" \
    "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}"
}
timed crictl "$(stamp_key build_crictl)" bin/crictl -- build_crictl

build_pause() {
  (cd "$here/pause" && nice go build -ldflags "-s -w" -o "$bin_dir/pause" .)
  image_from_binary pause "$PAUSE_VERSION" "$bin_dir/pause" 65535:65535
}
timed pause "$(stamp_key build_pause "$here/pause/main.go" "$here/pause/go.mod")" images/pause.tar -- build_pause

build_coredns() {
  gobin "" "github.com/coredns/coredns@${COREDNS_VERSION}"
  # Non-root: the node's Corefile listens on 1053 (the Service maps 53 to it).
  image_from_binary coredns "$COREDNS_VERSION" "$bin_dir/coredns" 65534:65534
}
timed coredns "$(stamp_key build_coredns)" bin/coredns images/coredns.tar -- build_coredns

echo "[node] all parts in $out ($(elapsed))"
