#!/usr/bin/env bash
# Build the Berth image (operator and registry server): `make image`.
#
#   IMAGE=ghcr.io/berth-dev/berth TAG=<version> bash hack/image.sh [docker build args...]
#
# The tag defaults to the project version, the tag the operator gives the registry
# servers it deploys (registry_operator.models.default_image). Needs a Docker engine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n1)"
image="${IMAGE:-ghcr.io/berth-dev/berth}:${TAG:-$version}"
docker build --tag "$image" "$@" "$root"
echo "$image"
