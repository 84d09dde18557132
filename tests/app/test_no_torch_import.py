"""Importing every app module (the whole UI) never loads torch, transformers or safetensors;
the real engine is imported lazily by ``app.bridge.make_engine``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import importlib, pkgutil, sys
import app
for module in pkgutil.iter_modules(app.__path__):
    importlib.import_module("app." + module.name)
print(sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules))
"""


def test_importing_the_app_loads_no_ml_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
