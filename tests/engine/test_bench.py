"""The benchmark: plan, dedup, default-alpha rule, projections, and a --quick run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.errors import InvalidRequestError
from engine.eval import bench, projection
from engine.eval.bench_report import projection_table
from engine.eval.eval_cli import parse_alphas, read_text_file
from engine.eval.projection import HostCost, host_cost_document
from tests.helpers.tiny_models import SENTENCES, save_tiny_checkpoint

REQUIRED = {
    "policy",
    "alpha",
    "cache_fraction",
    "top1_agreement",
    "kl",
    "nll",
    "ppl",
    "ppl_ref",
    "cloze_acc",
    "hit_rate",
    "plain_hit_rate",
    "misses_per_token",
    "bytes_per_token",
    "substitutions_per_token",
    "prefetch_precision",
    "prefetch_recall",
    "time_per_token_s",
    "tokens_per_second",
    "gen_tokens_per_second",
    "gen_time_to_first_token_s",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("bench-tiny")
    save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("bench-text") / "text.txt"
    path.write_text(" ".join(SENTENCES * 4), encoding="utf-8")
    return path


def test_plan_covers_policies_caches_and_alphas_only_where_they_matter() -> None:
    plan = bench.BenchPlan(cache_fractions=(0.25, 0.5), alphas=(0.0, 0.2))
    configs = plan.configs()
    # per cache: lru, lfu, score once each + three substituting policies x two alphas
    assert len(configs) == 2 * (3 + 3 * 2)
    full = [c for c in configs if c.name == "+cpu" and c.live.alpha == 0.2]
    assert full and all(
        c.live.substitution_on and c.live.prefetch_on and c.live.cpu_assist_on for c in full
    )
    score = next(c for c in configs if c.name == "score")
    assert score.live.effective_eviction == "score" and not score.live.substitution_on
    assert not score.live.prefetch_on and not score.live.cpu_assist_on
    with pytest.raises(InvalidRequestError, match="unknown bench policies"):
        bench.BenchPlan(policies=("lru", "magic"))


def test_same_behaviour_is_measured_once() -> None:
    plan = bench.BenchPlan(cache_fractions=(0.5,), alphas=(0.0, 0.3))
    keys = {c.name + str(c.live.alpha): bench.run_key(c) for c in plan.configs()}
    assert keys["score0.0"] == keys["+substitution0.0"]  # alpha 0 substitutes nothing
    assert keys["+substitution0.3"] != keys["score0.0"]
    assert keys["+prefetch0.0"] != keys["score0.0"]


def _row(
    alpha: float, top1: float, ppl_delta: float, policy: str = "+prefetch", kb: float | None = None
) -> dict[str, object]:
    return {
        "policy": policy,
        "alpha": alpha,
        "cache_fraction": 0.5,
        "top1_agreement": top1,
        "ppl_delta": ppl_delta,
        "bytes_per_token": 1000.0 * (1.0 - alpha) if kb is None else kb,
    }


def test_default_alpha_is_the_fastest_alpha_within_both_bounds() -> None:
    rows = [
        _row(0.0, 1.0, 0.0),
        _row(0.1, 0.99, 0.004),
        _row(0.2, 0.975, 0.015),
        _row(0.3, 0.96, 0.03),
        _row(0.4, 0.98, 0.01),
        _row(0.4, 0.5, 0.5, policy="lru"),
    ]
    assert bench.choose_default_alpha(rows) == 0.2  # 0.4 passes again but 0.3 broke the curve
    rows[1] = _row(0.1, 0.99, 0.004, kb=100.0)  # fewer bytes at 0.1 than at 0.2
    assert bench.choose_default_alpha(rows) == 0.1
    rows[1] = _row(0.1, 0.99, 0.05)  # perplexity bound alone fails at 0.1
    assert bench.choose_default_alpha(rows) == 0.0
    assert bench.choose_default_alpha([]) == 0.0


def test_default_alpha_ignores_the_timing_dependent_cpu_assist_rows() -> None:
    rows = [_row(0.0, 1.0, 0.0), _row(0.2, 0.99, 0.004), _row(0.4, 0.96, 0.01)]
    # +cpu at 0.4 moves the fewest bytes (a CPU-only run's timing noise) and is in bounds
    noisy = [_row(0.0, 1.0, 0.0, "+cpu"), _row(0.4, 0.99, 0.004, "+cpu", kb=1.0)]
    assert bench.choose_default_alpha(rows + noisy) == 0.2
    # a partial run that measured only one substituting policy still gets a curve and an alpha
    assert bench.choose_default_alpha(noisy) == 0.4
    assert bench.measured_policy(noisy, "+prefetch") == "+cpu"


def test_cpu_runs_report_substitution_and_prefetch_gpu_runs_the_whole_method() -> None:
    from engine.eval.bench_report import headline, reported_rows

    assert bench.headline_policy("cpu") == "+prefetch"
    assert bench.headline_policy("cuda") == "+cpu"
    rows = [
        {**_row(0.0, 1.0, 0.0, "lru", kb=1000.0), "hit_rate": 0.5},
        {**_row(0.2, 0.99, 0.0, "+prefetch", kb=600.0), "hit_rate": 0.6},
        {**_row(0.2, 0.99, 0.0, "+cpu", kb=300.0), "hit_rate": 0.6},
    ]
    assert [r["policy"] for r in reported_rows(rows, "cpu")] == ["lru", "+prefetch"]
    assert len(reported_rows(rows, "cuda")) == 3
    assert headline(reported_rows(rows, "cpu"), 0.2, "+prefetch")["bytes_ratio_vs_lru"] == 0.6
    assert headline(reported_rows(rows, "cpu"), 0.2, "+cpu") == {}
    figures = {"gen_tokens_per_second": 9.0, "kl": 0.0}
    rows = [{**r, **figures} for r in rows]
    result = bench.BenchResult(rows, 0.2, "m", {}, {"machine": {"cpu": "X", "cores": 2}})
    curve = bench.curve_document(result, "cpu")
    assert curve["policy"] == "+prefetch" and curve["machine"] == "X, 2 cores"
    assert [p["bytes_per_token"] for p in curve["points"]] == [600.0]


def test_the_projection_table_is_computed_from_counts_and_the_host_cost() -> None:
    """The report's projections: each row's counted expert uses and the host cost given,
    computed at render time (an older run's stored ``proj_ms`` figures are ignored)."""
    row = {
        "policy": "lru", "alpha": 0.0, "cache_fraction": 0.5, "hits": 60, "misses": 40,
        "substitutions": 0, "transfers": 40, "cpu_computed": 0,
        "proj_ms:Mixtral-8x7B:PCIe 4.0 x16": 1.0,
    }  # fmt: skip
    cheap, dear = HostCost(10.0, 1.0, 1e-6), HostCost(2000.0, 1.0, 1e-5)
    fractions = projection.fractions_from_counts(60, 0, 40, 0)
    for cost in (cheap, dear):
        table = projection_table([row], 0.0, cost)
        want = projection.project(
            projection.QWEN15_MOE_A27B, projection.LINKS[2], fractions, projection.Host(host=cost)
        )
        assert f"| {want.tokens_per_s_upper_bound:.1f} |" in table.splitlines()[-1], table
    assert projection_table([row], 0.0, cheap) != projection_table([row], 0.0, dear)
    assert "| 1000.0 |" not in projection_table([row], 0.0, cheap), "stored figure used"


def test_projections_grow_with_copies() -> None:
    few = {"hits": 90, "misses": 10, "substitutions": 0, "transfers": 10, "cpu_computed": 0}
    many = {"hits": 50, "misses": 50, "substitutions": 0, "transfers": 50, "cpu_computed": 0}
    fast, slow = bench.projections_of(few), bench.projections_of(many)
    key = "proj_ms:Mixtral-8x7B:PCIe 4.0 x16"
    assert key in fast and len(fast) == 12
    assert slow[key] > fast[key] > 0
    nothing = {"hits": 0, "misses": 0, "substitutions": 0, "transfers": 0, "cpu_computed": 0}
    assert bench.projections_of(nothing) == {}


def test_cli_parsers_reject_bad_input(tmp_path: Path) -> None:
    assert parse_alphas("0,0.1, 0.3") == (0.0, 0.1, 0.3)
    with pytest.raises(Exception, match="numbers separated by commas"):
        parse_alphas("0,x")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "One."}\n{"text": "Two."}\n', encoding="utf-8")
    assert read_text_file(jsonl) == "One.\n\nTwo."
    jsonl.write_text('{"body": 1}\n', encoding="utf-8")
    with pytest.raises(InvalidRequestError, match="'text' field"):
        read_text_file(jsonl)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        read_text_file(tmp_path / "missing.txt")


def _write_trace(folder: Path) -> None:
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(60)]).reshape(60, 1, 2)
    meta = {"model": "fake", "num_experts": 8, "top_k": 2, "num_layers": 1, "phase": "decode"}
    np.savez(
        folder / "fake_decode.npz",
        experts=experts.astype(np.int16),
        weights=np.full((60, 1, 2), 0.5, np.float16),
        seq_id=np.zeros(60, np.int64),
        pos=np.arange(60),
        layer_ids=np.array([0]),
        meta=json.dumps(meta),
    )


def _bench(checkpoint: Path, text_file: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "bench",
            "--model",
            str(checkpoint),
            "--text-file",
            str(text_file),
            "--quick",
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_quick_bench_writes_rows_report_plot_and_curve(
    checkpoint: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "user"))
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(builtin))
    traces = tmp_path / "traces"
    traces.mkdir()
    _write_trace(traces)
    assert _bench(checkpoint, text_file, tmp_path / "out", "--traces", str(traces)) == 0
    data = json.loads((tmp_path / "out" / "bench.json").read_text(encoding="utf-8"))
    rows = data["rows"]
    assert {r["policy"] for r in rows} == set(bench.POLICIES)
    for row in rows:
        assert row.keys() >= REQUIRED, REQUIRED - row.keys()
        assert not any(k.startswith("proj_ms:") for k in row), "rendered, not stored"
    baseline = next(r for r in rows if r["policy"] == "lru")
    assert baseline["top1_agreement"] == 1.0 and baseline["kl"] == 0.0
    assert baseline["bytes_per_token"] > 0  # half the experts cached: copies happen
    assert {r["shuffled"] for r in data["trace_replay"]} == {False, True}
    png = (tmp_path / "out" / "speed_vs_fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "out" / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "python -m engine bench" in report and "| lru | 50% |" in report
    assert "fake_decode" in report and "Projections (not measurements)" in report
    curve = json.loads((tmp_path / "user" / "curves" / f"{checkpoint.name}.json").read_text())
    assert curve["default_alpha"] == data["default_alpha"]
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.3]
    assert curve["policy"] == "+prefetch" and curve["device"] == "cpu" and curve["machine"]
    assert "| +cpu |" not in report and "without a GPU" in report
    assert not (checkpoint / "understudy_curve.json").exists()  # quick runs leave models alone
    assert "TTFT ms" in report and data["rows"][0]["gen_time_to_first_token_s"] > 0
    (tmp_path / "out" / "BENCHMARKS.md").unlink()
    assert main(["bench", "--out", str(tmp_path / "out"), "--rerender"]) == 0
    assert (tmp_path / "out" / "BENCHMARKS.md").read_text(encoding="utf-8") == report
    assert not (builtin / "understudy_curve.json").exists(), "a re-render touched another model"
    assert not (checkpoint / "understudy_curve.json").exists()  # the quick run's model too
    assert main(["bench", "--out", str(tmp_path / "nothing"), "--rerender"]) == 2
    _rerender_with_another_host_cost(tmp_path / "out", report)


def _rerender_with_another_host_cost(out: Path, report: str) -> None:
    """One command re-renders the projections with a new host cost (a CUDA one from the GPU
    check); a missing or malformed file is refused with exit 2 and the report is kept."""
    cuda = out / "host_cost_cuda.json"
    document = host_cost_document(2970.0, 30.0, 30, 9e-6, {"device": "cuda", "date": "D"})
    cuda.write_text(json.dumps(document), encoding="utf-8")
    base = ["bench", "--out", str(out), "--rerender", "--no-curve", "--host-cost"]
    assert main([*base, str(cuda)]) == 0
    again = (out / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert again != report and "`host_cost_cuda.json`, measured (cuda, D)" in again
    assert "99.0 ops and 1.0 syncs per MoE layer at 9.0 us per op" in again
    assert "Upper bound on tokens/s" in again
    for bad in (out / "absent.json", out / "bench.json"):  # missing; JSON without the fields
        assert main([*base, str(bad)]) == 2
    (out / "broken.json").write_text("{", encoding="utf-8")
    assert main([*base, str(out / "broken.json")]) == 2
    assert (out / "BENCHMARKS.md").read_text(encoding="utf-8") == again, "a refusal kept it"


def test_bench_without_traces_skips_cleanly_and_bad_folder_is_an_error(
    checkpoint: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "user"))
    args = ("--policies", "lru", "--no-curve")
    assert _bench(checkpoint, text_file, tmp_path / "a", "--no-traces", *args) == 0
    report = (tmp_path / "a" / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "Skipped: no trace folder" in report
    assert not (tmp_path / "user").exists()
    assert (
        _bench(checkpoint, text_file, tmp_path / "b", "--traces", str(tmp_path / "no"), *args) == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_bench_on_cuda(checkpoint: Path, text_file: Path, tmp_path: Path) -> None:
    assert _bench(checkpoint, text_file, tmp_path, "--no-traces", "--no-curve") == 0
    data = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert all(r["top1_agreement"] == 1.0 for r in data["rows"] if r["policy"] == "lru")


def test_headline_compares_the_full_method_with_lru_at_half_cache() -> None:
    from engine.eval.bench_report import headline, headline_text

    def row(policy: str, alpha: float, fraction: float, **values: float) -> dict[str, object]:
        base = {"policy": policy, "alpha": alpha, "cache_fraction": fraction}
        return {**base, "top1_agreement": 1.0, "ppl_delta": 0.0, "hit_rate": 0.5, **values}

    rows = [
        row("lru", 0.0, 0.5, bytes_per_token=1000.0, hit_rate=0.55),
        row("lru", 0.0, 0.25, bytes_per_token=5000.0),
        row(
            "+cpu",
            0.2,
            0.5,
            bytes_per_token=400.0,
            top1_agreement=0.98,
            ppl_delta=0.01,
            hit_rate=0.7,
        ),
        row("+cpu", 0.2, 0.25, bytes_per_token=10.0),
    ]
    head = headline(rows, alpha=0.2)
    assert head["bytes_ratio_vs_lru"] == pytest.approx(0.4)
    assert head["pass_bytes"] and head["pass_top1"] and head["pass_ppl"] and head["pass_hits"]
    rows[2]["top1_agreement"] = 0.9
    head = headline(rows, alpha=0.2)
    assert not head["pass_top1"]
    assert "**not met**" in headline_text(head) and "0.40 x LRU" in headline_text(head)
    assert headline(rows, alpha=0.4) == {}


def test_curve_is_written_where_possible_and_an_unwritable_path_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    good = tmp_path / "curves" / "m.json"
    written = bench.write_curve({"model": "m", "points": []}, [blocker / "m.json", good])
    assert written == [good]
    assert json.loads(good.read_text(encoding="utf-8"))["model"] == "m"
    assert "could not write the curve" in capsys.readouterr().err


def test_bench_count_ops_adds_per_token_counts_to_each_row(
    checkpoint: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "user"))
    out = tmp_path / "out"
    extra = ("--policies", "lru", "--no-traces", "--no-curve", "--count-ops")
    assert _bench(checkpoint, text_file, out, *extra) == 0
    rows = json.loads((out / "bench.json").read_text(encoding="utf-8"))["rows"]
    assert rows and all(r["ops_per_token"] and r["ops_per_token"] > 0 for r in rows)
    assert all(r["syncs_per_token"] >= 1 for r in rows)  # at least the sampled token


def test_a_full_run_on_the_assembled_builtin_also_writes_the_shipped_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.eval.eval_cli import _curve_targets
    from engine.paths import (
        ASSEMBLED_STAMP,
        assembled_model_dir,
        builtin_recipe_dir,
        user_data_dir,
    )

    monkeypatch.delenv("UNDERSTUDY_BUILTIN_MODEL", raising=False)
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UNDERSTUDY_RESOURCES", str(tmp_path / "resources"))
    folder = assembled_model_dir()
    folder.mkdir(parents=True)
    (folder / ASSEMBLED_STAMP).write_text('{"files": {}}')
    user_curve = user_data_dir() / "curves" / "m.json"
    assert _curve_targets(False, folder, "m") == [user_curve]
    assert _curve_targets(True, folder, "m") == [
        user_curve,
        folder / "understudy_curve.json",
        builtin_recipe_dir() / "understudy_curve.json",
    ]
