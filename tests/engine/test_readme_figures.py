"""The README's headline figures are the ones ``docs/benchmarks/bench.json`` gives, rendered by
the same code as ``docs/BENCHMARKS.md``, and the built-in model's shipped curve comes from the
same run (the bench writes all of them: ``python -m engine bench`` or ``--rerender``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.eval import bench_report
from engine.eval.bench import headline_policy

ROOT = Path(__file__).resolve().parents[2]
BENCH_JSON = ROOT / "docs" / "benchmarks" / "bench.json"
SHIPPED_CURVE = ROOT / "resources" / "models" / "understudy-smollm2-moe" / "understudy_curve.json"
# The small fixture's own run, kept because its shipped curve (the offline fallback's slider)
# comes from it: docs/benchmarks/mini-moe/ (re-rendered with --out there, --no-curve).
FIXTURE_BENCH_JSON = ROOT / "docs" / "benchmarks" / "mini-moe" / "bench.json"
FIXTURE_CURVE = ROOT / "resources" / "models" / "understudy-mini-moe" / "understudy_curve.json"


@pytest.fixture(scope="module")
def result() -> bench_report.BenchResult:
    return bench_report.read_result(BENCH_JSON)


def test_the_readme_table_and_its_source_line_come_from_bench_json(
    result: bench_report.BenchResult,
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = bench_report.readme_table(result)
    assert table and table in readme, f"re-generate the README table:\n{table}"
    block = bench_report.readme_block(result)
    assert block in readme, "re-generate: python -m engine bench --rerender"
    source = bench_report.readme_source(result)
    assert source in readme, f"the README must name the run: {source}"


def test_a_cpu_run_headlines_the_device_independent_rows(
    result: bench_report.BenchResult,
) -> None:
    device = bench_report.result_device(result)
    policy = headline_policy(device)
    assert device == "cuda" or policy == "+prefetch"
    report = (ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    head = bench_report.headline(
        bench_report.reported_rows(result.rows, device), result.default_alpha, policy
    )
    assert bench_report.headline_text(head) in report


@pytest.mark.parametrize(
    ("bench_json", "shipped"),
    [(BENCH_JSON, SHIPPED_CURVE), (FIXTURE_BENCH_JSON, FIXTURE_CURVE)],
    ids=["built-in", "small-fixture"],
)
def test_each_shipped_curve_is_from_its_models_run(bench_json: Path, shipped: Path) -> None:
    result = bench_report.read_result(bench_json)
    curve = json.loads(shipped.read_text(encoding="utf-8"))
    assert curve["measured_at"] == result.started
    assert curve["default_alpha"] == result.default_alpha
    assert curve["policy"] == headline_policy(bench_report.result_device(result))
    assert curve["model"] == result.model_name == shipped.parent.name


def test_the_projection_table_is_rendered_from_the_measured_host_cost(
    result: bench_report.BenchResult,
) -> None:
    """docs/BENCHMARKS.md's projections: bench.json's counts and docs/benchmarks/host_cost.json
    (what `hotpath --host-cost` measured), labelled as an upper bound on tokens/s."""
    from engine.eval import projection

    cost, origin = projection.read_host_cost(projection.HOST_COST_FILE)
    device = bench_report.result_device(result)
    rows = bench_report.reported_rows(result.rows, device)
    report = (ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    table = bench_report.projection_table(rows, result.default_alpha, cost)
    assert table in report, "re-render: python -m engine bench --rerender --no-curve"
    assert origin in report and "Upper bound on tokens/s" in report
