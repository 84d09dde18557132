"""The app in a real X11 window (Xvfb + the xcb platform plugin), loading a model through the
real engine and exiting cleanly. Skips where ``xvfb-run`` is not installed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
XVFB_RUN = shutil.which("xvfb-run")


@pytest.mark.skipif(XVFB_RUN is None, reason="xvfb-run is not installed (apt: xvfb)")
@pytest.mark.skipif(
    importlib.util.find_spec("engine.runtime.engine") is None, reason="real engine not built"
)
def test_real_window_under_xvfb_loads_a_model_with_the_real_engine(user_dirs: Path) -> None:
    from tests.helpers.tiny_models import save_tiny_checkpoint

    model = user_dirs / "tiny-moe"
    save_tiny_checkpoint(model)
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    env["UNDERSTUDY_BUILTIN_MODEL"] = str(model)
    result = subprocess.run(
        [str(XVFB_RUN), "-a", sys.executable, "-m", "app", "--smoke-test", "--require-model"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "SMOKE OK: loaded" in result.stdout
