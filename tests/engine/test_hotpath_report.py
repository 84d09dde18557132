"""The hotpath command's section of BENCHMARKS.md: written in place, kept by bench reruns."""

from __future__ import annotations

from pathlib import Path

from engine.eval.hotpath import (
    SECTION_BEGIN,
    SECTION_END,
    Speed,
    kept_section,
    ratios,
    render,
    replace_section,
    round_ratio_spreads,
    write_section,
)

RESULT = {
    "model": "m",
    "device": "cpu",
    "threads": 1,
    "machine": "x",
    "date": "d",
    "rows": {
        "transformers eager": {"ops_per_token": 100.0, "tokens_per_cpu_second": 10.0},
        "lru 0.5 eager": {"ops_per_token": 90.0, "tokens_per_cpu_second": 8.0},
        "smoe 0.5 a0.4 eager": {"ops_per_token": 95.0, "tokens_per_cpu_second": 6.0},
        "lru all-resident eager": {"tokens_per_cpu_second": 11.0},
    },
}


def test_ratios_are_cpu_time_speed_ratios_of_the_same_run() -> None:
    got = ratios(RESULT["rows"], 0.5, 0.4)  # type: ignore[arg-type]
    assert got["smoe vs lru (eager)"] == 6.0 / 8.0
    assert got["lru all-resident vs plain (eager)"] == 11.0 / 10.0
    assert got["smoe vs lru (grouped)"] is None  # not measured: said, not invented


def test_ratio_spreads_pair_the_runs_of_each_round() -> None:
    speeds = {
        "smoe 0.5 a0.4 eager": [Speed(1.0, 6.0), Speed(1.0, 9.0)],
        "lru 0.5 eager": [Speed(1.0, 8.0), Speed(1.0, 10.0)],
    }
    got = round_ratio_spreads(speeds, 0.5, 0.4)
    assert got["smoe vs lru (eager)"] == (0.75, 0.9)  # 6/8 and 9/10, not 6/10
    assert got["smoe vs lru (grouped)"] is None
    table = render(dict(RESULT, ratios=ratios(RESULT["rows"], 0.5, 0.4), ratio_ranges=got))
    assert "- smoe vs lru (eager): 0.75 (rounds 0.75-0.90)" in table


def test_section_is_appended_then_replaced_and_survives_a_regenerated_report(
    tmp_path: Path,
) -> None:
    result = dict(RESULT, ratios=ratios(RESULT["rows"], 0.5, 0.4))  # type: ignore[arg-type]
    table = render(result)
    assert "| smoe 0.5 a0.4 eager | 95 |" in table
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nbench tables\n", encoding="utf-8")
    write_section(path, f"{SECTION_BEGIN}\nfirst\n{SECTION_END}")
    write_section(path, f"{SECTION_BEGIN}\nsecond\n{SECTION_END}")
    text = path.read_text(encoding="utf-8")
    assert "bench tables" in text and "second" in text and "first" not in text
    kept = kept_section(text)
    assert kept is not None
    regenerated = replace_section("# Benchmarks\n\nnew bench tables\n", kept)
    assert "new bench tables" in regenerated and "second" in regenerated
    assert kept_section("no section here") is None


def test_the_host_cost_the_projection_charges_is_in_the_table() -> None:
    cost = {
        "configuration": "smoe 0.5 a0.4 grouped",
        "ops_per_layer": 21.0,
        "syncs_per_layer": 1.03,
        "seconds_per_op": 6.5e-6,
        "device": "cuda",
    }
    result = dict(RESULT, ratios=ratios(RESULT["rows"], 0.5, 0.4), host_cost=cost)  # type: ignore[arg-type]
    assert "21.0 ops and 1.0 syncs per MoE layer, 6.5 us per op on cuda" in render(result)
