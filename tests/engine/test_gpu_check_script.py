"""``scripts/gpu-check.sh --device cpu --quick``: the GPU check's own steps run on a CPU.

A smoke test of the script a GPU session runs once: every step runs and writes its files.
The figures of a quick CPU run mean nothing and are not checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_in_quick_mode(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    hotpath = json.loads((tmp_path / "hotpath.json").read_text())
    assert "transformers eager" in hotpath["rows"]
    bench = json.loads((tmp_path / "geometry_bench.json").read_text())
    assert bench["quick"] and {r["geometry"] for r in bench["rows"]} == {
        "Qwen1.5-MoE-A2.7B",
        "Mixtral-8x7B",
    }
    assert "QUICK" in (tmp_path / "geometry_bench.md").read_text()
