#!/usr/bin/env bash
# Build contexts for docker/build-push-action, the same as `visionloop images build` assembles in a temporary
# folder (src/visionloop/delivery/images.py): the Dockerfile, constraints.txt and the kind's wheelhouse as wheels/.
#   .github/scripts/image-contexts.sh [OUT]      -> OUT/context-serve, OUT/context-train (OUT defaults to build)
# The wheels target the images' interpreter and C library, not the runner's: Python 3.11 on Debian bookworm
# (glibc 2.36, python:3.11-slim-bookworm) for serve, on Ubuntu 22.04 (glibc 2.35, the CUDA base) for train.
# Needs visionloop installed (the core install is enough) and pip able to reach an index for the wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-build}"
declare -A platform=([serve]=manylinux_2_36_x86_64 [train]=manylinux_2_35_x86_64)
for kind in serve train; do
  visionloop images wheelhouse --kind "$kind" --output "$out/wheelhouse" \
    --python-version 3.11 --platform "${platform[$kind]}"
  rm -rf "$out/context-$kind"
  mkdir -p "$out/context-$kind"
  cp "deploy/docker/$kind.Dockerfile" "$out/context-$kind/Dockerfile"
  cp constraints.txt "$out/context-$kind/constraints.txt"
  cp -r "$out/wheelhouse/$kind" "$out/context-$kind/wheels"
done
du -sh "$out"/context-*
