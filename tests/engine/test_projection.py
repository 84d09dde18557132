"""The projection (a floor on time per token, an upper bound on tokens/s) against ANCHORS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.eval.projection import (
    DEEPSEEK_V2_LITE,
    FALLBACK_HOST_COST,
    GEOMETRIES,
    LINKS,
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    QWEN15_MOE_A27B,
    UPPER_BOUND_LABEL,
    Fractions,
    Geometry,
    Host,
    HostCost,
    Link,
    fractions_from_counts,
    host_cost_document,
    load_host_cost,
    measure_seconds_per_op,
    project,
    project_all,
)
from engine.eval.projection import (
    main as projection_main,
)

PCIE4 = Link("PCIe 4.0 x16", 25e9)


@pytest.mark.parametrize(
    ("geometry", "megabytes"),
    [(MIXTRAL_8X7B, 352), (QWEN15_MOE_A27B, 17.3), (DEEPSEEK_V2_LITE, 17.3), (QWEN3_30B_A3B, 9.4)],
)
def test_bytes_per_expert_match_anchors(geometry: Geometry, megabytes: float) -> None:
    assert geometry.bytes_per_expert() / 1e6 == pytest.approx(megabytes, rel=0.01)


@pytest.mark.parametrize(
    ("geometry", "billions"),
    [
        (MIXTRAL_8X7B, 46.7),
        (QWEN15_MOE_A27B, 14.3),
        (DEEPSEEK_V2_LITE, 15.7),
        (QWEN3_30B_A3B, 30.5),
    ],
)
def test_geometries_add_up_to_published_totals(geometry: Geometry, billions: float) -> None:
    g = geometry
    experts = g.moe_layers * g.experts_per_layer * g.bytes_per_expert() / 2
    total = (experts + g.non_expert_params) / 1e9
    assert total == pytest.approx(billions, rel=0.005)


def test_worked_example_of_anchors() -> None:
    # Mixtral at 4.5 bits, h = 0.9 over PCIe 4.0: about 25 ms of PCIe per token
    result = project(MIXTRAL_8X7B, PCIE4, Fractions(hit=0.9), bits=4.5)
    assert result.pcie_s == pytest.approx(0.0254, rel=0.02)
    half = project(MIXTRAL_8X7B, PCIE4, Fractions(hit=0.9, substituted=0.5), bits=4.5)
    assert half.pcie_s == pytest.approx(result.pcie_s / 2)


def test_cpu_share_moves_time_from_link_to_dram() -> None:
    no_cpu = project(QWEN3_30B_A3B, LINKS[0], Fractions(hit=0.5))
    with_cpu = project(QWEN3_30B_A3B, LINKS[0], Fractions(hit=0.5, cpu=0.5))
    assert with_cpu.pcie_s == pytest.approx(no_cpu.pcie_s / 2)
    assert with_cpu.cpu_s == pytest.approx(no_cpu.pcie_s / 2 * 6.2e9 / 65e9)
    assert with_cpu.overlapped_s < no_cpu.overlapped_s
    assert with_cpu.serial_s == pytest.approx(
        with_cpu.pcie_s + with_cpu.cpu_s + with_cpu.gpu_s + with_cpu.host_s
    )


def test_all_hits_leave_only_gpu_time() -> None:
    host = Host(host=HostCost(0.0, 0.0, 0.0))
    result = project(QWEN15_MOE_A27B, LINKS[2], Fractions(hit=1.0), host)
    assert result.pcie_s == 0 and result.cpu_s == 0 and result.host_s == 0
    gpu_bytes = QWEN15_MOE_A27B.non_expert_bytes + QWEN15_MOE_A27B.expert_bytes_per_token()
    assert result.gpu_s == pytest.approx(gpu_bytes / host.vram_bandwidth)
    assert result.tokens_per_s_upper_bound == pytest.approx(1 / result.gpu_s)


def test_host_time_is_charged_per_layer_and_the_label_says_upper_bound() -> None:
    """The formula and its label stay together: host time can only lower the tok/s bound."""
    cost = HostCost(ops_per_layer=130, syncs_per_layer=2, seconds_per_op=8e-6, sync_seconds=1e-5)
    free = project(QWEN15_MOE_A27B, LINKS[2], Fractions(hit=1.0), Host(host=HostCost(0, 0, 0)))
    charged = project(QWEN15_MOE_A27B, LINKS[2], Fractions(hit=1.0), Host(host=cost))
    assert charged.host_s == pytest.approx(24 * (130 * 8e-6 + 2 * 1e-5))  # 24 MoE layers
    assert charged.overlapped_s == max(charged.gpu_s, charged.host_s)
    assert charged.tokens_per_s_upper_bound <= free.tokens_per_s_upper_bound
    assert "upper bound on tokens/s" in UPPER_BOUND_LABEL
    assert charged.serial_s == pytest.approx(charged.gpu_s + charged.host_s)
    with pytest.raises(ValueError, match="seconds_per_op"):
        HostCost(1, 1, -1.0)


def test_fractions_from_counts() -> None:
    f = fractions_from_counts(hits=60, substitutions=20, loads=15, cpu_computed=5)
    assert (f.hit, f.substituted, f.cpu) == pytest.approx((0.6, 0.5, 0.25))
    assert f.copied == pytest.approx(0.15) and f.cpu_computed == pytest.approx(0.05)
    assert fractions_from_counts(10, 0, 0, 0).substituted == 0.0
    with pytest.raises(ValueError, match="no expert uses"):
        fractions_from_counts(0, 0, 0, 0)
    with pytest.raises(ValueError, match="hit"):
        Fractions(hit=1.2)


def test_project_all_covers_every_geometry_and_link() -> None:
    rows = project_all(Fractions(hit=0.6))
    assert len(rows) == len(GEOMETRIES) * len(LINKS)
    mixtral = [r for r in rows if r.geometry == "Mixtral-8x7B"]
    assert [r.link for r in mixtral] == [link.name for link in LINKS]
    assert mixtral[0].pcie_s > mixtral[1].pcie_s > mixtral[2].pcie_s


def test_host_cost_comes_from_the_measured_document(tmp_path: Path) -> None:
    """The projection charges what ``hotpath --host-cost`` measured; without the file, the
    recorded fallback; a document without the counts is refused with a clear message."""
    document = host_cost_document(600.0, 31.0, 30, 7e-6, {"device": "cpu"})
    assert document["ops_per_layer"] == 20.0 and document["seconds_per_op"] == 7e-6
    path = tmp_path / "host_cost.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    cost = load_host_cost(path)
    assert cost == HostCost(ops_per_layer=20.0, syncs_per_layer=31.0 / 30, seconds_per_op=7e-6)
    assert load_host_cost(tmp_path / "absent.json") == FALLBACK_HOST_COST
    with pytest.raises(ValueError, match="seconds_per_op"):
        HostCost.from_document({"ops_per_layer": 1, "syncs_per_layer": 1})
    with pytest.raises(ValueError, match="moe_layers"):
        host_cost_document(1.0, 1.0, 0, 1e-6, {})
    assert 0 < measure_seconds_per_op(repeats=50) < 1e-2


def test_the_bound_is_re_rendered_from_a_host_cost_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m engine.eval.projection --host-cost`` (what the GPU check's CUDA cost feeds)
    prints the upper-bound table with that cost; a missing file or a bad fraction is refused."""
    path = tmp_path / "host_cost.json"
    path.write_text(json.dumps(host_cost_document(600.0, 30.0, 30, 5e-6, {})), encoding="utf-8")
    assert projection_main(["--host-cost", str(path), "--hit", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "Upper bound on tokens/s" in out and "20.0 ops and 1.0 syncs" in out
    assert "| Qwen1.5-MoE-A2.7B | PCIe 4.0 x16 |" in out
    with pytest.raises(SystemExit):
        projection_main(["--host-cost", str(tmp_path / "absent.json")])
    with pytest.raises(SystemExit):
        projection_main(["--host-cost", str(path), "--hit", "1.5"])
