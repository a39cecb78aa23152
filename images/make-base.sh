#!/usr/bin/env bash
# Build a local base image (Debian 12 + Python 3.11) from Debian's packages alone, for
# machines that cannot pull from a registry:  bash images/make-base.sh [TAG]
# then:  palp image build --target cpu --base-image palp-base:bookworm ...
# It stands in for python:3.11-slim-bookworm, whose Python is a shared library: libpython3.11
# provides it here (torch_xla's extension, in the tpu image, links against libpython3.11.so.1.0).
set -euo pipefail
tag=${1:-palp-base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,libpython3.11,ca-certificates \
  bookworm "$root" http://deb.debian.org/debian >/dev/null
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "$tag"
