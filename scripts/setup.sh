#!/usr/bin/env bash
# Create .venv and install Understudy with pinned versions.
# Installs the CPU build of torch when no NVIDIA GPU is present, and keeps it that way:
# the rest of the install is constrained to the torch already there.
# Usage: bash scripts/setup.sh [extra,...]   (e.g. "test" or "test,dev,bench")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python

have_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "GPU"
}

installed_torch() {
    "$VPY" -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null || true
}

install_torch() {
    local current
    current="$(installed_torch)"
    if [ "$(uname -s)" = "Darwin" ]; then
        # macOS wheels are CPU/MPS builds and carry no +cpu label.
        [ "$current" = "$TORCH_VERSION" ] && return 0
        "$VPY" -m pip install "torch==$TORCH_VERSION"
    elif have_nvidia_gpu; then
        case "$current" in "$TORCH_VERSION"|"$TORCH_VERSION"+cu*) return 0 ;; esac
        echo "[setup] NVIDIA GPU found: installing CUDA torch $TORCH_VERSION"
        "$VPY" -m pip install "torch==$TORCH_VERSION"
    else
        [ "$current" = "$TORCH_VERSION+cpu" ] && return 0
        echo "[setup] no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
        # A local wheel (pip's find-links) first; then the PyTorch CPU index.
        "$VPY" -m pip install --no-deps --no-index "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || "$VPY" -m pip install --no-deps "torch==$TORCH_VERSION+cpu" \
                --index-url https://download.pytorch.org/whl/cpu
    fi
}

install_torch
TORCH_NOW="$(installed_torch)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_NOW" > "$CONSTRAINTS"

TARGET="."
[ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
STAMP=".venv/.understudy-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS-$TORCH_NOW"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing understudy $TARGET (torch $TORCH_NOW kept)"
    "$VPY" -m pip install -q -c "$CONSTRAINTS" -e "$TARGET"
    echo "$WANT" > "$STAMP"
fi
"$VPY" -c "import torch; assert torch.__version__ == '$TORCH_NOW', torch.__version__"
echo "[setup] ready: torch $TORCH_NOW, python $("$VPY" -c 'import sys; print(sys.version.split()[0])')"
