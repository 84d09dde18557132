"""The host plan: Algorithm 1 in numpy equals the tensor reference; the plan's index lists.

``substitute_host`` (what the engine runs per layer, on the one host copy of the routing) must
decide exactly what ``substitution.substitute`` decides on the same tables, for every router
shape the engine supports (softmax with and without renormalisation, scaled, group-limited,
biased sigmoid), every weight mode, one to three tokens, and alphas across the range.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.eval.opcount import OpCounter
from engine.offload.plan import HostRouting, LayerPlan, classify_host, substitute_host
from engine.offload.substitution import RouterSpec, classify, substitute

SPECS = {
    "mixtral": RouterSpec("mixtral", "softmax", num_experts=8, top_k=2, norm_topk_prob=True),
    "qwen": RouterSpec("qwen2_moe", "softmax", num_experts=16, top_k=4),
    "deepseek_v2": RouterSpec(
        "deepseek_v2", "softmax", 16, 3, scaling=2.5, group_score="max", n_group=4, topk_group=2
    ),
    "deepseek_v3": RouterSpec(
        "deepseek_v3",
        "sigmoid",
        16,
        4,
        norm_topk_prob=True,
        scaling=2.5,
        group_score="top2_sum",
        n_group=4,
        topk_group=2,
    ),
}


def _table(spec: RouterSpec, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Scores, the model's top-k and weights, a residency mask and (V3) a bias."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, spec.num_experts, generator=generator) * 2
    scores = logits.sigmoid() if spec.kind == "sigmoid" else logits.softmax(-1)
    bias = torch.randn(spec.num_experts, generator=generator) * 0.1
    bias = bias if spec.family == "deepseek_v3" else None
    choice = scores if bias is None else scores + bias
    idx = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = (weights * spec.scaling).to(torch.bfloat16)
    resident = torch.rand(spec.num_experts, generator=generator) < 0.5
    return scores, idx, weights, resident, bias  # type: ignore[return-value]


CASES = list(
    itertools.product(SPECS, (1, 2, 3), (0.0, 0.1, 0.3, 0.6), ("own", "own_renorm", "replaced"))
)


@pytest.mark.parametrize(("family", "tokens", "alpha", "mode"), CASES)
def test_host_algorithm_one_equals_the_tensor_reference(
    family: str, tokens: int, alpha: float, mode: str
) -> None:
    spec = SPECS[family]
    for seed in range(6):
        scores, idx, weights, resident, bias = _table(spec, tokens, seed)
        want = substitute(scores, idx, weights, resident, spec, alpha, bias=bias, weight_mode=mode)
        host = HostRouting(scores.numpy(), idx.numpy(), weights.float().numpy())
        have = substitute_host(
            host,
            resident.numpy(),
            spec,
            alpha,
            bias=None if bias is None else bias.numpy(),
            weight_mode=mode,  # type: ignore[arg-type]
        )
        where = f"{family} T={tokens} alpha={alpha} {mode} seed={seed}"
        if have is None:
            assert torch.equal(want.idx, idx) and not want.substituted.any(), where
            continue
        assert want.idx.tolist() == have.idx.tolist(), where
        assert want.substituted.tolist() == have.substituted.tolist(), where
        got = torch.from_numpy(have.weights).to(weights.dtype)
        assert torch.equal(want.weights, got), where


@pytest.mark.parametrize("family", list(SPECS))
def test_host_bands_equal_the_tensor_bands(family: str) -> None:
    spec = SPECS[family]
    for seed, tokens in itertools.product(range(5), (1, 3)):
        scores, idx, _w, _r, bias = _table(spec, tokens, seed)
        want = classify(scores, idx, spec, 0.3, bias)
        have = classify_host(
            scores.numpy(), idx.numpy(), spec, 0.3, None if bias is None else bias.numpy()
        )
        assert want.top_score.tolist() == have.top_score.tolist()
        assert want.candidate.tolist() == have.candidate.tolist()


def test_host_routing_reads_in_one_packed_copy() -> None:
    scores = torch.rand(3, 8).softmax(-1)
    idx = torch.tensor([[7, 1], [0, 2], [5, 5]])
    weights = torch.rand(3, 2).to(torch.bfloat16)
    host = HostRouting.read(scores, idx, weights)
    assert host.idx.dtype == np.int64 and host.idx.tolist() == idx.tolist()
    assert np.array_equal(host.scores, scores.numpy())
    assert torch.equal(torch.from_numpy(host.weights).to(torch.bfloat16), weights)
    assert host.extra is None


def test_the_next_layers_prediction_rides_in_the_same_copy() -> None:
    scores, idx, weights = torch.rand(2, 8), torch.tensor([[3, 1], [0, 6]]), torch.rand(2, 2)
    predicted = torch.rand(2, 8)
    with OpCounter() as counter:
        host = HostRouting.read(scores, idx, weights, predicted)
    assert counter.sync_kinds == {"numpy": 1}, counter.sync_kinds
    assert host.idx.tolist() == idx.tolist() and np.array_equal(host.weights, weights.numpy())
    assert host.extra is not None and np.array_equal(host.extra, predicted.numpy())


def test_layer_plan_orders_pairs_like_the_eager_loop() -> None:
    idx = np.array([[3, 1], [1, 4], [3, 3]])  # 3 tokens, k = 2 (token 2 routes twice to 3)
    plan = LayerPlan(idx, num_experts=4)  # 4 is the padding id: never an expert
    assert plan.experts == [1, 3]
    mask = torch.nn.functional.one_hot(torch.from_numpy(idx), 5).permute(2, 1, 0)
    for expert in plan.experts:
        pos, tok = plan.eager_pairs(expert)
        want_pos, want_tok = torch.where(mask[expert])
        assert pos.tolist() == want_pos.tolist() and tok.tolist() == want_tok.tolist()
    packed, spans = plan.eager_indices()
    assert packed.tolist() == [1, 0, 0, 1, 0, 2, 2, 0, 0, 1]  # tokens, then positions
    assert [(e, n) for e, _s, n in spans] == [(1, 2), (3, 3)]
    grouped = plan.grouped_indices({1: 5, 3: 0}, num_slots=6)
    assert grouped.pairs.tolist() == [0, 4, 5, 1, 2]  # slot 0 (expert 3) first, stable
    assert grouped.tokens.tolist() == [0, 2, 2, 0, 1]
    assert grouped.offsets.tolist() == [3, 3, 3, 3, 3, 5]


def test_one_token_fast_paths_equal_the_batch_paths() -> None:
    """A decode step's single row takes 1-D numpy paths; a batch of two copies of it agrees."""
    from engine.offload.plan import _classify_row, _classify_rows, mix_weights

    rng = np.random.default_rng(11)
    for trial in range(600):
        e = int(rng.integers(4, 40))
        k = int(rng.integers(1, min(e - 1, 8) + 1))
        scores = rng.random((1, e)).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores * 4) / np.float32(4)  # ties at the band edges
        scores /= scores.sum()
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
        alpha = float(rng.choice([0.0, 0.1, 0.4, 1.0]))
        one, two = _classify_row(scores, idx, alpha), _classify_rows(scores, idx, alpha)
        assert np.array_equal(one.top_score, two.top_score), trial
        assert np.array_equal(one.candidate, two.candidate), trial
        new = idx.copy()
        swapped = rng.random((1, k)) < 0.4
        new[swapped] = rng.integers(0, e, size=int(swapped.sum()))
        weights = scores[0, idx[0]][None, :] / scores[0, idx[0]].sum(dtype=np.float32)
        spec = RouterSpec(
            family="t", kind="softmax", num_experts=e, top_k=k,
            norm_topk_prob=bool(trial % 2), scaling=float(rng.choice([1.0, 2.5])),
        )  # fmt: skip
        row = HostRouting(scores, idx, weights.astype(np.float32))
        pair = HostRouting(*(np.concatenate([a, a]) for a in (scores, idx, row.weights)))
        for mode in ("own", "own_renorm", "replaced"):
            want = mix_weights(
                pair, np.concatenate([new, new]), np.concatenate([swapped] * 2), spec, mode
            )
            have = mix_weights(row, new, swapped, spec, mode)  # type: ignore[arg-type]
            assert have.dtype == want.dtype and np.array_equal(have[0], want[0]), (trial, mode)
