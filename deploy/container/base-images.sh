#!/usr/bin/env bash
# Make the base images for building and running ViT Serve with podman and no image registry:
#
#   localhost/vit-serve-debian:bookworm      Debian 12 minbase + python3 (3.11), python3-venv,
#                                            ca-certificates, libgomp1 (mmdebstrap + podman import)
#   localhost/vit-serve-base:bookworm        + uv: the service image's base (base.Containerfile)
#   localhost/vit-serve-prometheus:bookworm  + Debian's prometheus (prometheus.Containerfile)
#
# Each is built only if missing or its recipe changed (--rebuild rebuilds all three). Needs root, podman, runc and
# mmdebstrap (apt-get install podman runc mmdebstrap), the host's Debian package sources and PyPI.
# Podman runs with deploy/container/containers.conf unless CONTAINERS_CONF names another file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

ROOT_IMAGE=localhost/vit-serve-debian:bookworm
BASE_IMAGE=localhost/vit-serve-base:bookworm
PROMETHEUS_IMAGE=localhost/vit-serve-prometheus:bookworm
# The root file system is bootstrapped from the host's own apt sources (one-line or deb822),
# so it uses whatever mirror this machine is set up with; DEBIAN_SOURCES names another file.
if [ -z "${DEBIAN_SOURCES:-}" ]; then
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$candidate" ]; then DEBIAN_SOURCES=$candidate; break; fi
  done
fi
[ -n "${DEBIAN_SOURCES:-}" ] || { echo "no apt sources found: set DEBIAN_SOURCES" >&2; exit 1; }
# The host's CA bundle: pip and uv inside the build reach PyPI through whatever it trusts.
CA_MOUNT=/etc/ssl/certs:/etc/ssl/certs:ro

rebuild=false
[ "${1:-}" = "--rebuild" ] && rebuild=true

for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y podman runc mmdebstrap" >&2; exit 1; }
done

missing() { $rebuild || ! podman image exists "$1"; }

if missing "$ROOT_IMAGE"; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "== $ROOT_IMAGE: mmdebstrap bookworm"
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    bookworm "$work/rootfs.tar" "$DEBIAN_SOURCES" </dev/null
  podman import "$work/rootfs.tar" "$ROOT_IMAGE" >/dev/null
  rm -rf "$work"
  trap - EXIT
fi

# An image is rebuilt when its recipe changed: the label vit-serve.recipe holds a hash of it.
recipe() { cat "$here/$1" "$here/uv-requirements.txt" | sha256sum | cut -c1-16; }
built_from() { podman image inspect --format '{{ index .Labels "vit-serve.recipe" }}' "$1" 2>/dev/null; }
build() {  # build IMAGE CONTAINERFILE
  sha="$(recipe "$2")"
  if missing "$1" || [ "$(built_from "$1")" != "$sha" ]; then
    echo "== $1: podman build -f $2"
    podman build --network=host --volume "$CA_MOUNT" --build-arg "ROOT_IMAGE=$ROOT_IMAGE" \
      --label "vit-serve.recipe=$sha" --tag "$1" --file "$here/$2" "$here"
  fi
}
build "$BASE_IMAGE" base.Containerfile
build "$PROMETHEUS_IMAGE" prometheus.Containerfile
podman image ls --filter reference='localhost/vit-serve-*'
