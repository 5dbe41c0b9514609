#!/usr/bin/env bash
# Build the project's container image from the repository's own Dockerfile,
# with no registry: the base image is made here from Debian packages.
#
#   1. mmdebstrap makes a Debian 12 root filesystem with python3 (3.11, the
#      Dockerfile's Python), venv, pip and ca-certificates -> a base image;
#   2. buildah builds ./Dockerfile unchanged, with --build-arg BASE_IMAGE
#      naming that base image.
#
# Everything lives in ${PATIO_CACHE_DIR:-$HOME/.cache/patio}/image/:
#   storage/            buildah's image store (vfs driver, this cache only)
#   base-<key>.stamp    the base image for this package list is built
#   patio-<key>/        the patio image for these sources:
#       image.tar       OCI archive (for `ctr images import`), name patio:dev
#       rootfs.tar      the flattened root filesystem (for runc bundles)
#       config.json     the image's config (User, Env, WorkingDir, Entrypoint)
#       .used           touched by each run that uses it (a warm run, --print-dir)
# <key> is a hash of every input, so a warm run does nothing. Each folder is
# ~465 MB: a build keeps the two other folders used last (other checkouts may
# share this cache) and any used within the hour (a test may be reading it),
# and deletes the rest.
#
#   hack/image/build.sh                 build what is missing
#   hack/image/build.sh --print-dir     the patio-<key> folder for the sources now
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache_root="${PATIO_CACHE_DIR:-${HOME:-/root}/.cache/patio}"
cache="$cache_root/image"

# The base: Debian 12 packages. python-is-python3 gives `python` like the
# python:*-slim images; passwd gives useradd.
suite=bookworm
packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd

hash_of() { sha256sum | cut -c1-16; }
base_key="$( { echo "$suite $packages"; sed -n '/^# --- base/,/^# --- end base/p' "$0"; } | hash_of)"
# The sources the Dockerfile copies (.dockerignore leaves the rest out of the
# context), the Dockerfile itself, this script and the base.
src_key="$(
  cd "$root"
  {
    echo "$base_key"
    cat Dockerfile .dockerignore "$here/build.sh"
    find pyproject.toml README.md patio operator/src examples/k8s/tasks.py -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path '*.egg-info/*' \
      | LC_ALL=C sort | xargs sha256sum
  } | hash_of
)"
out="$cache/patio-$src_key"
mark_used() { if [ -f "$out/.done" ]; then touch "$out/.used"; fi; }
case "${1:-}" in
  --print-dir) mark_used; echo "$out"; exit 0 ;;
  "") ;;
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
esac
if [ -f "$out/.done" ]; then
  mark_used
  echo "[image] patio image up to date: $out"
  exit 0
fi
for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install mmdebstrap buildah)" >&2; exit 1; }
done
mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
[ -f "$out/.done" ] && { mark_used; echo "[image] patio image up to date: $out"; exit 0; }

# buildah only ever touches this cache's store, never the machine's.
# Its network settings too: buildah writes a CNI lock under its config folder
# (/etc/cni/net.d by default) even with --network host.
mkdir -p "$cache/cni" && printf '[network]\nnetwork_config_dir = "%s"\n' "$cache/cni" >"$cache/containers.conf"
bh() { CONTAINERS_CONF="$cache/containers.conf" nice buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"; }
t_start=$(date +%s)

# --- base
base_image="localhost/patio-base:$base_key"
if ! bh inspect --type image "$base_image" >/dev/null 2>&1; then
  echo "[image] base: mmdebstrap $suite with $packages ..."
  t0=$(date +%s)
  tmp="$(mktemp -d "$cache/base.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  SOURCE_DATE_EPOCH=0 nice mmdebstrap --quiet --variant=essential --include="$packages" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$tmp/rootfs.tar"
  c="$(bh from scratch)"
  bh add --quiet "$c" "$tmp/rootfs.tar" / >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$c"
  bh commit --rm --quiet "$c" "$base_image" >/dev/null
  rm -rf "$tmp"; trap - EXIT
  echo "[image] base: built in $(( $(date +%s) - t0 ))s"
fi
# --- end base

# --- patio: the repository's Dockerfile. pip inside the build reaches PyPI
# through this machine's network and trusts what this machine trusts: its
# CA bundle and pip config are mounted for RUN steps only (not in the image).
echo "[image] patio: buildah bud Dockerfile (BASE_IMAGE=$base_image) ..."
t0=$(date +%s)
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -f /etc/pip.conf ] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
image="localhost/patio:$src_key"
bh bud --quiet --layers=false --isolation chroot --network host "${mounts[@]}" \
  --build-arg "BASE_IMAGE=$base_image" -t "$image" -f "$root/Dockerfile" "$root" >/dev/null
echo "[image] patio: built in $(( $(date +%s) - t0 ))s"

rm -rf "$out.tmp"; mkdir -p "$out.tmp"
bh inspect --type image "$image" \
  | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["OCIv1"]["config"], sys.stdout, indent=1)' \
  >"$out.tmp/config.json"
bh push --quiet "$image" "oci-archive:$out.tmp/image.tar:patio:dev"
c="$(bh from "$image")"
mnt="$(bh mount "$c")"
tar -C "$mnt" --numeric-owner -cf "$out.tmp/rootfs.tar" .
bh umount "$c" >/dev/null; bh rm "$c" >/dev/null
# Keep the store small: only the base stays (the next build starts from it).
bh rmi "$image" >/dev/null 2>&1 || true
bh rmi --prune >/dev/null 2>&1 || true
touch "$out.tmp/.done" "$out.tmp/.used"
rm -rf "$out"; mv "$out.tmp" "$out"
# Images of other sources, last used first: keep two, and any used within the
# hour; a folder from before .used existed counts from its own time.
find "$cache" -maxdepth 1 -name 'patio-*.tmp' -exec rm -rf {} +
for dir in "$cache"/patio-*; do
  case "$dir" in "$out" | *.tmp) continue ;; esac
  [ -e "$dir" ] || continue
  used="$dir/.used"; [ -e "$used" ] || used="$dir"
  echo "$(stat -c %Y "$used") $dir"
done | sort -rn | tail -n +3 | while read -r when dir; do
  if [ "$when" -lt "$(( $(date +%s) - 3600 ))" ]; then
    echo "[image] removing the image of older sources: $dir"
    rm -rf "$dir"
  fi
done
echo "[image] done in $(( $(date +%s) - t_start ))s: $out ($(du -sh "$out/rootfs.tar" | cut -f1) root filesystem)"
