"""Torch ops and host syncs per decoded token on the built-in model (counts are stable).

The counter itself is checked on hand-made calls; then the engine's decode is held to the
issue's aims that hold today: one sync per MoE layer plus the sampled token, LRU and the
whole method at cache 0.5 alike (the next layer's prediction rides in the routing copy; the
aim is at most MoE layers + 8), and fewer ops than plain transformers with the grouped path.
(The ops aim of <= 0.6x transformers is not met on this 5-layer model; see docs/BENCHMARKS.md:
the trunk's own ops already exceed it. It is met on the 30-layer SmolLM2 MoE.)
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main
from engine.config import LiveOptions
from engine.eval import hotpath
from engine.eval.opcount import OpCounter, OpCounts, per_token
from engine.paths import fallback_model_dir

TOKENS = 6


def test_counter_sees_ops_and_each_kind_of_host_read() -> None:
    x = torch.arange(6.0)
    with OpCounter() as counter:
        y = x * 2 + 1  # two ops, no sync
        assert counter.syncs == 0 and counter.ops >= 2
        y.tolist()
        bool(y[0] > 0)
        torch.nonzero(y)
        y.sum().item()
    assert counter.sync_kinds == {"tolist": 1, "__bool__": 1, "nonzero": 1, "item": 1}
    assert OpCounts(10, 3, {"a": 3}).minus(OpCounts(4, 1, {"a": 1})) == OpCounts(6, 2, {"a": 2})
    assert per_token(OpCounts(10, 4, {"a": 4}), 2).syncs == 2.0
    with pytest.raises(ValueError, match="at least one"):
        per_token(OpCounts(1, 1, {}), 0)


def test_reads_of_host_tensors_do_not_count_on_a_cuda_run() -> None:
    with OpCounter("cuda") as counter:
        torch.ones(3).tolist()  # a host tensor: already on the host in a CUDA run
    assert counter.syncs == 0


@pytest.fixture(scope="module")
def counts() -> dict[str, object]:
    model_dir = fallback_model_dir()  # the small 5-layer model, even once the MoE is assembled
    configs = {c.name: c for c in hotpath.default_configs(0.5, 0.4)}
    wanted = [hotpath.PLAIN, "lru 0.5 eager", "smoe 0.5 a0.4 eager", "smoe 0.5 a0.4 grouped"]
    out = {}
    for name in wanted:
        runner = hotpath._load(configs[name], model_dir, "cpu")
        out[name] = hotpath.count_decode(runner, TOKENS)
        if hasattr(runner, "close"):
            runner.close()
    return out


def test_decode_syncs_once_per_layer_and_within_the_aim(counts: dict[str, object]) -> None:
    layers = 5  # the small model
    lru, smoe = counts["lru 0.5 eager"], counts["smoe 0.5 a0.4 eager"]
    assert lru.syncs == layers + 1, lru.sync_kinds  # type: ignore[attr-defined]
    assert smoe.syncs == layers + 1, smoe.sync_kinds  # type: ignore[attr-defined]
    plain = counts[hotpath.PLAIN]
    assert plain.syncs > 4 * layers  # type: ignore[attr-defined]


def test_prefetch_from_the_output_costs_a_second_read_per_layer() -> None:
    """The released code's predictor (``--prefetch-from output``): one more read per MoE
    layer that has a next MoE layer, and it still prefetches."""
    live = LiveOptions(policy="smoe", alpha=0.4, prefetch_from="output")
    config = hotpath.HotpathConfig("smoe output", 0.5, live, "eager")
    runner = hotpath._load(config, fallback_model_dir(), "cpu")
    try:
        counts = hotpath.count_decode(runner, TOKENS)
        stats = runner.stats()
    finally:
        runner.close()
    layers = 5
    assert counts.syncs == 2 * layers, counts.sync_kinds  # type: ignore[union-attr]
    assert stats.prefetch_issued > 0, stats


def test_grouped_smoe_issues_fewer_ops_than_plain_transformers(counts: dict[str, object]) -> None:
    plain, grouped = counts[hotpath.PLAIN], counts["smoe 0.5 a0.4 grouped"]
    assert grouped.ops < 0.85 * plain.ops, (grouped.ops, plain.ops)  # type: ignore[attr-defined]


def test_generate_count_ops_reports_per_token_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            *("generate", "--prompt", "Hello", "--greedy", "--max-new-tokens", "4"),
            *("--count-ops", "--device", "cpu", "--json"),
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    counts = data["op_counts"]
    if len(data["token_ids"]) >= 2:
        assert counts["ops_per_token"] > 0 and counts["syncs_per_token"] >= 1
    else:
        assert counts is None


def test_the_method_costs_few_ops_per_layer_over_lru(counts: dict[str, object]) -> None:
    """Substitution, prefetch prediction and accounting add at most a few ops per MoE layer
    on the eager path: the prediction is a matmul and a softmax on the layer's normed state
    riding in the routing copy, the rest is host arithmetic (was ~15 per layer)."""
    layers = 5
    lru, smoe = counts["lru 0.5 eager"], counts["smoe 0.5 a0.4 eager"]
    extra = smoe.ops - lru.ops  # type: ignore[attr-defined]
    assert extra <= 4 * layers, (smoe.ops, lru.ops)  # type: ignore[attr-defined]
