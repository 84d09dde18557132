#!/usr/bin/env bash
# Set everything up, then start the Understudy desktop app on its built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m app "$@"
