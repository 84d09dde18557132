#!/usr/bin/env bash
# The GPU check for a short device loan (issue 9): CUDA torch, the cuda tests, the decode hot
# path on the built-in model, and decode speed on real geometries with random bf16 weights.
# Writes everything under $OUT (default docs/benchmarks/gpu): pytest log, hotpath.json,
# geometry_bench.json and geometry_bench.md.
#
# Usage: bash scripts/gpu-check.sh [--device cpu] [--quick]
#   --device cpu --quick   runs the same steps on a CPU with shrunk geometry (a smoke test of
#                          the script itself; the figures mean nothing).
# Python: $PYTHON if set, else .venv/bin/python, else python3; it must have torch with CUDA
# (for --device cuda). When it has not, scripts/setup.sh is tried (it needs a package index).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        *) echo "usage: bash scripts/gpu-check.sh [--device cpu|cuda] [--quick]" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-docs/benchmarks/gpu}"
mkdir -p "$OUT"

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; return; fi
    echo python3
}
PY="$(pick_python)"
"$PY" -c "import torch" 2>/dev/null || {
    echo "[gpu-check] $PY has no torch: set PYTHON, or run scripts/setup.sh first" >&2; exit 1; }
has_cuda() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ "$DEVICE" = cuda ] && ! has_cuda; then
    echo "[gpu-check] $PY has no CUDA torch; trying scripts/setup.sh (needs a package index)"
    bash scripts/setup.sh test,bench
    PY=.venv/bin/python
    has_cuda || { echo "[gpu-check] still no CUDA torch: stop" >&2; exit 1; }
fi
"$PY" -c "import torch; print('[gpu-check] torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QT_QPA_PLATFORM=offscreen

echo "[gpu-check] 1/3 pytest -m cuda"
if [ "$DEVICE" = cuda ]; then
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/gpu 2>&1 | tee "$OUT/pytest_cuda.log"
else
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/gpu 2>&1 | tail -3 | tee "$OUT/pytest_cuda.log"
fi

echo "[gpu-check] 2/3 hot path on the built-in model (ops, syncs, tok/s side by side)"
ROUNDS=3; TOKENS=32
[ -n "$QUICK" ] && { ROUNDS=1; TOKENS=4; }
"$PY" -m engine hotpath --device "$DEVICE" --threads 1 --rounds "$ROUNDS" --tokens "$TOKENS" \
    --json > "$OUT/hotpath.json"

echo "[gpu-check] 3/3 real geometries with random bf16 weights"
GB_TOKENS=32
[ -n "$QUICK" ] && GB_TOKENS=4
"$PY" -m engine.eval.geometry_bench --out "$OUT" --device "$DEVICE" --tokens "$GB_TOKENS" $QUICK
echo "[gpu-check] done: $OUT"
