"""``python -m app --smoke-test``: the headless launch check the installers run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "app", "--smoke-test", "--timeout", "60", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_smoke_test_with_the_demo_engine_loads_and_exits_0(user_dirs: Path) -> None:
    result = launch("--demo", env_extra={})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SMOKE OK: loaded" in result.stdout
    assert not (user_dirs / "config" / "running").exists(), "a clean exit removes the marker"
    assert (user_dirs / "data" / "chats.sqlite3").exists()
    assert (user_dirs / "data" / "logs" / "understudy.log").exists()


def test_smoke_test_reports_a_missing_model_and_require_model_fails(user_dirs: Path) -> None:
    missing = {"UNDERSTUDY_BUILTIN_MODEL": str(user_dirs / "no-such-model")}
    shown = launch(env_extra=missing)
    assert shown.returncode == 0, "an error shown in the window still counts as started"
    assert "SMOKE OK:" in shown.stdout and "no-such-model" in shown.stdout
    strict = launch("--require-model", env_extra=missing)
    assert strict.returncode == 1 and "SMOKE FAILED:" in strict.stdout
