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
    cost = json.loads((tmp_path / "host_cost.json").read_text())
    assert cost["ops_per_layer"] > 0 and cost["seconds_per_op"] > 0 and cost["device"] == "cpu"
    for stem, geometry in (("qwen15moe", "Qwen1.5-MoE-A2.7B"), ("mixtral", "Mixtral-8x7B")):
        bench = json.loads((tmp_path / f"geometry_{stem}.json").read_text())
        assert bench["quick"] and {r["geometry"] for r in bench["rows"]} == {geometry}
        assert "QUICK" in (tmp_path / f"geometry_{stem}.md").read_text()
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert [s["exit"] for s in timings["steps"]] == [0, 0, 0, 0], timings
    cuda_budget = sum(s["budget_s"] for s in timings["steps"]) / timings["budget_scale"]
    assert cuda_budget <= 480, timings  # what the script allows itself on a device loan
    assert len(list(tmp_path.iterdir())) <= 8  # a device call brings back at most 8 files
