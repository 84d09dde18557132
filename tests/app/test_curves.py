"""Benchmark curve files read by the importance slider."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.curves import Curve, CurveError, CurvePoint, describe, load_curve, save_curve


def test_curve_round_trip_and_lookup_by_alpha(tmp_path: Path) -> None:
    curve = Curve(
        "mini",
        (CurvePoint(0.0, 10.0, 2e8, 1.0, 0.0), CurvePoint(0.3, 14.5, 1e8, 0.97, 0.02)),
        device="cuda",
    )
    save_curve(curve, tmp_path)
    loaded = load_curve("mini", tmp_path)
    assert loaded == curve
    assert loaded.at(0.3) == curve.points[1]
    assert loaded.at(0.15) is None, "between measured points: not measured"


def test_missing_curve_is_none_and_a_bad_one_is_an_error(tmp_path: Path) -> None:
    assert load_curve("nothing", tmp_path) is None
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "bad.json").write_text(json.dumps({"points": [{"speed": 1}]}))
    with pytest.raises(CurveError, match="every point needs an alpha"):
        load_curve("bad", tmp_path)
    (tmp_path / "curves" / "worse.json").write_text("{oops")
    with pytest.raises(CurveError, match="cannot read"):
        load_curve("worse", tmp_path)


def test_describe_shows_speed_and_fidelity() -> None:
    text = describe(CurvePoint(0.3, 14.5, 1.2e8, 0.975, 0.021))
    assert text == ("14.5 tok/s, 120.0 MB/token moved, top-1 agreement 97.5%, perplexity +2.1%")
    assert describe(None) == "not measured yet"


def test_a_curve_shipped_with_the_model_is_used_until_one_is_measured(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shipped = {"model": "mini", "points": [{"alpha": 0.2, "top1_agreement": 0.99, "kl": 0.1}]}
    (model_dir / "understudy_curve.json").write_text(json.dumps(shipped))
    found = load_curve("mini", tmp_path / "data", model_dir)
    assert found is not None and found.at(0.2) == CurvePoint(0.2, top1_agreement=0.99)
    save_curve(Curve("mini", (CurvePoint(0.2, top1_agreement=0.5),)), tmp_path / "data")
    mine = load_curve("mini", tmp_path / "data", model_dir)
    assert mine is not None and mine.points[0].top1_agreement == 0.5, "the user's own wins"


def test_between_interpolates_inside_the_measured_range_only() -> None:
    curve = Curve(
        "m", (CurvePoint(0.0, 10.0, None, 1.0, 0.0), CurvePoint(0.2, 20.0, None, 0.9, 0.02))
    )
    mid = curve.between(0.05)
    assert mid is not None and mid.tokens_per_second == pytest.approx(12.5)
    assert mid.top1_agreement == pytest.approx(0.975) and mid.bytes_per_token is None
    assert curve.between(0.3) is None


def test_small_figures_read_well() -> None:
    assert describe(CurvePoint(0.6, bytes_per_token=11_200, ppl_delta=-0.0001)) == (
        "11.2 KB/token moved, perplexity +0.0%"
    )


def test_a_cpu_curve_shows_no_speed_and_says_where_its_figures_come_from() -> None:
    from app.curves import axis_labels, curve_source

    point = CurvePoint(0.4, 212.0, 336_000, 0.986, 0.001)
    cpu = Curve("m", (point,), "cpu", "2026-11-28T22:50:00Z", 0.4, "AMD EPYC 7B13, 2 cores")
    text = describe(point, cpu)
    assert "tok/s" not in text and "336.0 KB/token moved" in text  # alpha trades copies here
    assert curve_source(cpu) == "benchmark curve (AMD EPYC 7B13, 2 cores, 2026-11-28)"
    assert axis_labels(cpu) == ("exact", "fewer copies, approximate")
    gpu = Curve("m", (point,), "cuda", "2026-11-28", machine="RTX 4070")
    assert describe(point, gpu).startswith("212.0 tok/s") and axis_labels(gpu)[1].startswith(
        "faster"
    )
    assert axis_labels(None)[1] == "fewer copies, approximate"  # no curve: no speed claim
