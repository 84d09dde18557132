#!/usr/bin/env bash
# The GPU check for a short device loan (issue 9): the cuda tests, the decode hot path (and the
# host cost per op the projections charge), and decode speed on real geometries with random
# bf16 weights. Writes 8 files under $OUT (default docs/benchmarks/gpu; a device call brings
# back at most 8): pytest_cuda.log, hotpath.json, host_cost.json, geometry_qwen15moe.{json,md},
# geometry_mixtral.{json,md}, and timings.json (each step's time against its budget).
#
# Usage: bash scripts/gpu-check.sh [--device cpu] [--quick]
#   --device cpu --quick   the same steps on a CPU with shrunk geometry and the small model (a
#                          smoke test of the script itself; the figures mean nothing).
#
# Python: $PYTHON if set; else python3 when its torch sees CUDA (a device machine's image has
# CUDA torch and no network); else .venv/bin/python. Packages the image lacks or has at another
# version travel as wheels: run `bash scripts/gpu-wheels.sh` here first (it fills .whl/, which
# .git/info/exclude ignores; name .whl in the device call's carry); step 0 installs them with
# --no-index into /tmp/understudy-site. Nothing is downloaded on the device machine.
#
# Size of what a device call sends (the working tree, at most 64 MiB): on 2026-11-29 the tracked
# files are 72.6 MB (69.2 MiB), over that limit. 47.7 MB of it is the small model, which the hot
# path step uses; 20.1 MB is resources/models/understudy-smollm2-moe/moefy.safetensors, which
# nothing here needs (the device cannot assemble the SmolLM2 MoE: no wheel, no network). Move
# that file out of the working tree for the call and back after (`git checkout -- FILE`); the
# tree is then ~52.6 MB, leaving ~14 MB for .whl/.
#
# Time budget (CUDA; each step is stopped at its budget by `timeout`, and the geometry steps
# keep the rows measured before the stop): 20 + 90 + 60 + 200 + 110 = 480 s at most. The
# estimate behind it, per geometry on one H100/H200: build the checkpoint (random bf16 init on
# the GPU, then save_pretrained: 28.6 GB for Qwen1.5-MoE at ~1 GB/s, ~30 s; Mixtral's 4 layers
# with embeddings ~7.3 GB, ~10 s), then four loads of it (transformers on GPU, accelerate
# offload, engine all-resident, engine at 50%: each reads the checkpoint from the page cache
# and pins the expert store, ~15-20 s for Qwen) and 24 decoded tokens per configuration (under
# 1 s each on the GPU; accelerate's offload moves half the weights per token, ~0.6 s a token
# for 6 tokens). Qwen ~130-160 s, Mixtral ~60-80 s, the cuda tests ~60 s, the hot path on the
# small model ~30 s.
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
TIMINGS=()
START_ALL=$SECONDS
SCALE=1  # the budgets are a CUDA machine's; a CPU smoke run gets four times as long
[ "$DEVICE" = cuda ] || SCALE=4

# step NAME BUDGET_SECONDS COMMAND...: run with a time budget, print and record how long it took
step() {
    local name="$1" budget=$(($2 * SCALE)); shift 2
    local start=$SECONDS rc=0
    echo "[gpu-check] $name (budget ${budget} s)" >&2
    timeout "$budget" "$@" || rc=$?
    local spent=$((SECONDS - start))
    if [ "$rc" = 124 ]; then
        echo "[gpu-check] $name: stopped at its budget of ${budget} s (partial results kept)" >&2
    fi
    echo "[gpu-check] $name: ${spent} s of ${budget} s, exit ${rc}" >&2
    TIMINGS+=("{\"step\": \"$name\", \"budget_s\": $budget, \"spent_s\": $spent, \"exit\": $rc}")
}

write_timings() {
    local IFS=,
    printf '{"device": "%s", "quick": %s, "budget_scale": %d, "total_s": %d, "steps": [%s]}\n' \
        "$DEVICE" "$([ -n "$QUICK" ] && echo true || echo false)" "$SCALE" \
        $((SECONDS - START_ALL)) "${TIMINGS[*]}" > "$OUT/timings.json"
}
trap write_timings EXIT

echo "[gpu-check] 0/4 setup: pick a Python with torch (CUDA for --device cuda), install the"
echo "[gpu-check]     carried wheels in .whl/ if any (no network is used), check the imports"
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if command -v python3 >/dev/null && has_cuda python3; then echo python3; return; fi
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; return; fi
    echo python3
}
PY="$(pick_python)"
"$PY" -c "import torch" 2>/dev/null || {
    echo "[gpu-check] $PY has no torch: set PYTHON, or run scripts/setup.sh first" >&2; exit 1; }
if [ "$DEVICE" = cuda ] && ! has_cuda "$PY"; then
    echo "[gpu-check] $PY's torch does not see a CUDA device: stop (set PYTHON to one that does)" >&2
    exit 1
fi
SITE=/tmp/understudy-site
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1
"$PY" - <<'EOF' 
import importlib, sys
import torch, transformers
print(f"[gpu-check] python {sys.version.split()[0]}, torch {torch.__version__}, cuda "
      f"{torch.cuda.is_available()}, transformers {transformers.__version__}")
missing = []
for name in ("engine.cli", "engine.eval.hotpath", "engine.eval.geometry_bench", "pytest"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(f"{name}: {error}")
if missing:
    print("[gpu-check] missing: " + "; ".join(missing) + " (bash scripts/gpu-wheels.sh here, "
          "then carry .whl)")
    sys.exit(1)
EOF

if [ -n "$QUICK" ]; then
    MODEL=(--model resources/models/understudy-mini-moe); ROUNDS=1; TOKENS=4; GB_TOKENS=4
else
    MODEL=(); ROUNDS=3; TOKENS=32; GB_TOKENS=24
fi

step "1/4 pytest -m cuda" 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/gpu \
    > "$OUT/pytest_cuda.log" 2>&1
tail -3 "$OUT/pytest_cuda.log" || true

step "2/4 hot path (ops, syncs, tok/s side by side; host cost per op)" 60 \
    "$PY" -m engine hotpath --device "$DEVICE" --threads 1 --rounds "$ROUNDS" \
    --tokens "$TOKENS" "${MODEL[@]}" --json --host-cost "$OUT/host_cost.json" \
    > "$OUT/hotpath.json"

step "3/4 Qwen1.5-MoE-A2.7B geometry, random bf16 weights, cache 25% and 50%" 200 \
    "$PY" -m engine.eval.geometry_bench --out "$OUT" --device "$DEVICE" \
    --tokens "$GB_TOKENS" --geometries qwen15moe --cache-fractions 0.25 0.5 \
    --stem geometry_qwen15moe $QUICK
step "4/4 Mixtral-8x7B geometry (4 of 32 layers), random bf16 weights, cache 50%" 110 \
    "$PY" -m engine.eval.geometry_bench --out "$OUT" --device "$DEVICE" \
    --tokens "$GB_TOKENS" --geometries mixtral --cache-fractions 0.5 \
    --stem geometry_mixtral $QUICK
echo "[gpu-check] done in $((SECONDS - START_ALL)) s: $OUT"
echo "[gpu-check] projections with this host cost, back on the dev machine: python -m engine bench --rerender --no-curve --host-cost $OUT/host_cost.json"
