#!/usr/bin/env bash
# Wheels the GPU check needs on a device machine that has CUDA torch but no network.
#
# A device machine's image (Python 3.12, CUDA torch, transformers, accelerate, numpy,
# safetensors, pytest) lacks some of the engine's pinned packages or has them at other
# versions. This downloads those, pinned as in pyproject.toml, as Python 3.12 manylinux wheels
# into .whl/ (ignored through .git/info/exclude); name .whl in the device call's carry and
# scripts/gpu-check.sh installs them with --no-index. Run it here, where a package index is
# reachable. About 14 MB (transformers' other needs are in the image at usable versions).
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE="$(git rev-parse --git-path info/exclude)"  # a worktree's .git is a file
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
PY="${PYTHON:-python3}"
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | tr -d '"'; }
PACKAGES=("$(pin transformers)" "$(pin tokenizers)" "$(pin platformdirs)" "$(pin gguf)")
echo "[gpu-wheels] ${PACKAGES[*]} -> .whl/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${PACKAGES[@]}"
du -sh .whl
