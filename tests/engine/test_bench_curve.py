"""The substitution curve as text (table, verdict, README block) and when a curve ships.

Rows are made by hand here: these are formatting and rule checks, not measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.eval import bench_curve, bench_report
from engine.eval.bench import BenchResult, choose_default_alpha
from engine.eval.eval_cli import ships_curve, update_readme


def _row(policy: str, alpha: float, top1: float, ppl: float, kb: float, cache: float = 0.5):
    return {
        "policy": policy,
        "alpha": alpha,
        "cache_fraction": cache,
        "top1_agreement": top1,
        "ppl_delta": ppl,
        "bytes_per_token": kb * 1e3,
        "substitutions_per_token": alpha * 100,
        "hit_rate": 0.7,
        "kl": 0.0,
        "gen_tokens_per_second": 1.0,
        "tokens_per_second": 1.0,
    }


def _rows(top1_at_small_alpha: float) -> list[dict[str, Any]]:
    """LRU and a curve that breaks after the first alpha above 0 (or at it)."""
    rows = [_row("lru", 0.0, 1.0, 0.0, 16000)]
    for policy in ("+substitution", "+prefetch", "+cpu"):
        rows += [
            _row(policy, 0.0, 1.0, 0.0, 15000),
            _row(policy, 0.005, top1_at_small_alpha, 0.004, 14500),
            _row(policy, 0.02, 0.91, 0.029, 13600),
        ]
    return rows


def _result(rows: list[dict[str, Any]]) -> BenchResult:
    settings = {"command": "python -m engine bench --x", "machine": {"device": "cpu", "cpu": "c"}}
    return BenchResult(
        rows, choose_default_alpha(rows), "m", {}, settings, [], "2026-11-29T04:00:00Z"
    )


def test_alphas_are_written_as_measured_not_rounded_to_one_decimal() -> None:
    assert [bench_curve.alpha_text(a) for a in (0.0, 0.005, 0.4)] == ["0", "0.005", "0.4"]
    table = bench_report.main_table(_rows(0.99))
    assert "| 0.005 |" in table, "a fine alpha grid must stay readable in the tables"


def test_the_curve_table_lists_every_alpha_with_ratio_and_bounds() -> None:
    table = bench_curve.curve_table(_rows(0.95), 0.5)
    lines = table.splitlines()[2:]
    assert len(lines) == 9, "three substituting policies x three alphas"
    small = next(line for line in lines if "alone" in line and "| 0.005 |" in line)
    assert "| 0.91 |" in small and "| 0.9500 |" in small and small.endswith("| no |")
    exact = next(line for line in lines if "alone" in line and "| 0 |" in line)
    assert exact.endswith("| yes |")


def test_verdict_says_alpha_zero_when_no_alpha_keeps_fidelity() -> None:
    rows = _rows(0.95)
    assert choose_default_alpha(rows) == 0.0
    text = bench_curve.verdict(rows, 0.5, 0.0)
    assert "within bounds: none" in text and "stays **0 (exact" in text
    good = _rows(0.99)
    assert choose_default_alpha(good) == 0.005
    text = bench_curve.verdict(good, 0.5, 0.005)
    assert "within bounds: 0.005" in text and "default alpha is 0.005" in text


def test_readme_block_is_replaced_between_markers_and_left_alone_without(tmp_path: Path) -> None:
    result = _result(_rows(0.95))
    readme = tmp_path / "README.md"
    begin, end = bench_curve.BLOCK_BEGIN, bench_curve.BLOCK_END
    readme.write_text(f"# x\n\nbefore\n{begin}\nold table\n{end}\nafter\n", encoding="utf-8")
    assert update_readme(readme, result) == readme
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and text.startswith("# x\n\nbefore\n")
    assert text.endswith(f"{end}\nafter\n")
    assert bench_report.readme_block(result) in text
    assert "Substitution curve at cache 50%" in text and "stays **0 (exact" in text
    assert update_readme(readme, result) == readme
    assert readme.read_text(encoding="utf-8") == text, "regenerating twice changes nothing"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n", encoding="utf-8")
    assert update_readme(plain, result) is None
    assert plain.read_text(encoding="utf-8") == "no markers\n"
    assert update_readme(tmp_path / "missing.md", result) is None


def test_a_curve_ships_only_from_a_full_size_run_of_every_policy_at_half_cache() -> None:
    rows = _rows(0.95) + [_row(p, 0.0, 1.0, 0.0, 15500) for p in ("lfu", "score")]
    assert ships_curve(False, rows), "a run with fewer alphas or caches still measured the curve"
    assert not ships_curve(True, rows), "a smoke run never ships"
    measure = [r for r in rows if r["policy"] == "+prefetch"]  # what the app's Measure runs
    assert not ships_curve(False, measure), "Measure must not overwrite the shipped curve"
    quarter = [dict(r, cache_fraction=0.25) for r in rows]
    assert not ships_curve(False, quarter)
