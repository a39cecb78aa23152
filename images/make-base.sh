#!/usr/bin/env bash
# Build a local base image (Debian 12 + Python 3.11) from Debian's packages alone, for
# machines that cannot pull from a registry:  bash images/make-base.sh [TAG]
# then:  palp image build --target cpu --base-image palp-base:bookworm ...
set -euo pipefail
tag=${1:-palp-base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" http://deb.debian.org/debian >/dev/null
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "$tag"
