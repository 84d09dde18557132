"""``engine.eval.cpu_assist_study --quick``: every CPU-assist path runs, agrees with the fp64
reference, and reports what it keeps in RAM (a smoke test of the command, not a measurement)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.eval.cpu_assist_study import main


def test_quick_study_checks_every_path_and_counts_its_bytes(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--quick"]) == 0
    (written,) = tmp_path.glob("cpu_assist_study_*.json")
    rows = json.loads(written.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"lru hit (fp32 decoded once)", "int4pack bf16 Q4_1", "int8 bmm Q8_0"} <= methods
    for row in rows:
        bound = 2e-2 if "bf16" in row["method"] else 1e-5
        assert row["max_rel_err"] < bound, row
        assert row["us_per_call"] > 0
    kept = {r["method"]: r["kept_bytes"] / r["fp32_bytes"] for r in rows if r["tokens"] == 1}
    assert kept["lru hit (fp32 decoded once)"] == 1.0 and kept["decode+mm Q8_0"] == 0
    assert kept["int4pack bf16 Q4_1"] == 5 / 32, "4-bit quants + bf16 scale and zero per 32"
    assert kept["int4pack Q4_1"] == 6 / 32, "fp32 scale and zero"
