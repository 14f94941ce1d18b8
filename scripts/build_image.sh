#!/usr/bin/env bash
# Build the project's images with buildah, offline from any registry: the base image is made from
# Debian's own packages with debootstrap (Python 3.11 is bookworm's), the project from PyPI.
#   scripts/build_image.sh cpu     -> localhost/cacara:VERSION
#   scripts/build_image.sh cuda    -> localhost/cacara-cuda:VERSION (on top of the CPU image)
# Where Docker and a registry are at hand, `docker build .` with the public Python base does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-cpu}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
base="localhost/cacara-base:bookworm"
isolation="${BUILDAH_ISOLATION:-chroot}"

need() {
  command -v buildah >/dev/null && command -v debootstrap >/dev/null && return
  if [ "$(id -u)" -ne 0 ]; then
    echo "buildah and debootstrap are missing: sudo apt-get install buildah debootstrap" >&2; exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends buildah debootstrap
}

base_image() {
  buildah inspect --type image "$base" >/dev/null 2>&1 && return
  root="$(mktemp -d)"
  trap 'rm -rf "$root" "$root.tar"' RETURN
  echo "== debootstrap bookworm (minbase + python3.11) into $root"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$root.tar" .
  ctr="$(buildah from scratch)"
  buildah add "$ctr" "$root.tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  buildah commit --rm "$ctr" "$base" >/dev/null
}

# The CA bundle this machine's pip trusts (a TLS-intercepting proxy re-signs PyPI): mounted into the
# build's RUN steps only, never copied into a layer.
ca_args=()
host_ca="${PIP_CERT:-$(pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$/\1/p" | head -1)}"
host_ca="${host_ca:-/etc/ssl/certs/ca-certificates.crt}"
if [ -n "$host_ca" ] && [ -f "$host_ca" ]; then
  ca_args=(--volume "$host_ca:/run/host-ca.pem:ro" --build-arg PIP_CERT=/run/host-ca.pem)
fi

need
[ -f data/manifest.jsonl ] || { echo "the demo corpus is missing: run \`make data\` first" >&2; exit 1; }
case "$variant" in
  cpu)
    base_image
    buildah bud --isolation "$isolation" --layers --build-arg BASE_IMAGE="$base" "${ca_args[@]}" \
      -f Dockerfile -t "localhost/cacara:$version" .
    ;;
  cuda)
    buildah inspect --type image "localhost/cacara:$version" >/dev/null 2>&1 || "$0" cpu
    buildah bud --isolation "$isolation" --build-arg CPU_IMAGE="localhost/cacara:$version" \
      -f Dockerfile.cuda -t "localhost/cacara-cuda:$version" .
    ;;
  *) echo "usage: $0 cpu|cuda" >&2; exit 2 ;;
esac
