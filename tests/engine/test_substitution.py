"""Importance bands and Algorithm 1 on hand-built and random score tables."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from engine.errors import SubstitutionUnsupportedError
from engine.offload.substitution import (
    RouterSpec,
    affinities,
    allowed_experts,
    classify,
    spec_from_config,
    substitute,
)

MIXTRAL = RouterSpec(family="mixtral", kind="softmax", num_experts=6, top_k=2, norm_topk_prob=True)
QWEN = RouterSpec(family="qwen2_moe", kind="softmax", num_experts=6, top_k=2)


def _route(probs: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own top-k choice and weights, as transformers computes them."""
    value, idx = probs.topk(spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        value = value / value.sum(dim=-1, keepdim=True)
    return idx, value * spec.scaling


def _allowed(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    mask = allowed_experts(choice, spec)
    assert mask is not None, "a group-limited spec must give a mask"
    return mask


def _mask(num: int, members: set[int]) -> torch.Tensor:
    return torch.tensor([e in members for e in range(num)])


TABLE = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.03, 0.02]])


def test_bands_on_hand_built_table() -> None:
    idx, _ = _route(TABLE, MIXTRAL)
    bands = classify(TABLE, idx, MIXTRAL, alpha=0.3)
    # S = 0.20: upper edge 0.26 keeps expert 0 top-score, expert 1 low-score; lower edge 0.14
    assert bands.top_score.tolist() == [[True, False]]
    assert bands.candidate[0].tolist() == [False, False, True, False, False, False]
    wider = classify(TABLE, idx, MIXTRAL, alpha=0.6)  # lower edge 0.08 admits expert 3
    assert wider.candidate[0].tolist() == [False, False, True, True, False, False]


def test_bands_edges_follow_alpha() -> None:
    idx, _ = _route(TABLE, MIXTRAL)
    assert classify(TABLE, idx, MIXTRAL, alpha=0.0).top_score.all()
    assert not classify(TABLE, idx, MIXTRAL, alpha=0.0).candidate.any()
    low = classify(TABLE, idx, MIXTRAL, alpha=0.6).top_score  # upper edge 0.32
    assert low.tolist() == [[True, False]]


def test_alpha_zero_returns_the_same_tensors() -> None:
    probs = torch.rand(5, 6).softmax(-1)
    idx, w = _route(probs, MIXTRAL)
    out = substitute(probs, idx, w, torch.zeros(6, dtype=torch.bool), MIXTRAL, alpha=0.0)
    assert out.idx is idx and out.weights is w
    assert out.count == 0


def test_missing_low_score_expert_is_replaced_by_resident_candidate() -> None:
    idx, w = _route(TABLE, MIXTRAL)
    resident = _mask(6, {0, 2})
    out = substitute(TABLE, idx, w, resident, MIXTRAL, alpha=0.3, weight_mode="own")
    assert sorted(out.idx[0].tolist()) == [0, 2]
    assert out.count == 1
    slot = out.idx[0].tolist().index(2)
    assert out.weights[0, slot].item() == pytest.approx(0.20 / 0.65)
    assert out.weights[0, 1 - slot].item() == pytest.approx(0.40 / 0.65)


def test_weight_modes() -> None:
    idx, w = _route(TABLE, MIXTRAL)
    resident = _mask(6, {0, 2})
    replaced = substitute(TABLE, idx, w, resident, MIXTRAL, alpha=0.3, weight_mode="replaced")
    assert replaced.weights is w  # the substitute inherits the replaced slot's weight
    renorm = substitute(TABLE, idx, w, resident, MIXTRAL, alpha=0.3, weight_mode="own_renorm")
    slot = renorm.idx[0].tolist().index(2)
    assert renorm.weights[0, slot].item() == pytest.approx(0.20 / 0.60)
    assert renorm.weights[0].sum().item() == pytest.approx(1.0)
    plain = substitute(TABLE, idx, TABLE.gather(1, idx), resident, QWEN, 0.3, weight_mode="own")
    assert plain.weights[0, plain.idx[0].tolist().index(2)].item() == pytest.approx(0.20)


def test_resident_low_score_expert_is_kept_and_top_score_never_substituted() -> None:
    idx, w = _route(TABLE, MIXTRAL)
    kept = substitute(TABLE, idx, w, _mask(6, {1, 2}), MIXTRAL, alpha=0.3)
    assert kept.count == 0 and kept.idx is idx
    # expert 0 is top-score and missing: it stays selected even with a candidate resident
    top = substitute(TABLE, idx, w, _mask(6, {2}), MIXTRAL, alpha=0.3)
    assert 0 in top.idx[0].tolist()


def test_nothing_outside_the_band_is_used() -> None:
    idx, w = _route(TABLE, MIXTRAL)
    out = substitute(TABLE, idx, w, _mask(6, {3, 4, 5}), MIXTRAL, alpha=0.3)
    assert out.count == 0 and torch.equal(out.idx, idx)


def test_batch_top_score_set_counts_as_available() -> None:
    probs = torch.tensor(
        [
            [0.05, 0.05, 0.05, 0.60, 0.05, 0.20],  # token 0: 3 and 5 top-score
            [0.36, 0.05, 0.05, 0.19, 0.20, 0.15],  # token 1: 4 low-score, 3 a candidate
        ]
    )
    idx, w = _route(probs, MIXTRAL)
    nothing = torch.zeros(6, dtype=torch.bool)
    out = substitute(probs, idx, w, nothing, MIXTRAL, alpha=0.3)
    assert sorted(out.idx[1].tolist()) == [0, 3]
    assert out.substituted[0].sum() == 0
    alone = substitute(probs, idx, w, nothing, MIXTRAL, alpha=0.3, batch_set=False)
    assert alone.count == 0


def _served(final: list[int], available: set[int]) -> int:
    return sum(e in available for e in final)


def _brute_force_best(
    choice: list[float], selected: list[int], top: list[bool], cands: set[int], avail: set[int]
) -> int:
    """Best count of available experts over every legal replacement of missing low experts."""
    missing = [e for e, t in zip(selected, top, strict=True) if not t and e not in avail]
    best = _served(selected, avail)
    for size in range(1, len(missing) + 1):
        for replaced in itertools.combinations(missing, size):
            for subs in itertools.permutations(sorted(cands & avail), size):
                final = [e for e in selected if e not in replaced] + list(subs)
                best = max(best, _served(final, avail))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_algorithm_1_maximises_hits_plus_substitutions(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    e, k = 7, 3
    spec = RouterSpec(family="t", kind="softmax", num_experts=e, top_k=k, norm_topk_prob=True)
    probs = (torch.randn(1, e, generator=gen) * 0.6).softmax(-1)
    alpha = 0.05 + 0.55 * torch.rand(1, generator=gen).item()
    resident = torch.rand(e, generator=gen) < 0.5
    idx, w = _route(probs, spec)
    bands = classify(probs, idx, spec, alpha)
    out = substitute(probs, idx, w, resident, spec, alpha)
    avail = {i for i in range(e) if resident[i]}
    cands = {i for i in range(e) if bands.candidate[0, i]}
    final = out.idx[0].tolist()
    expect = _brute_force_best(
        probs[0].tolist(), idx[0].tolist(), bands.top_score[0].tolist(), cands, avail
    )
    assert _served(final, avail) == expect, f"seed {seed}: {final} vs best {expect}"
    assert len(set(final)) == k, "a substitute duplicated an expert"
    for slot in range(k):
        if out.substituted[0, slot]:
            assert final[slot] in cands & avail
            assert not bands.top_score[0, slot]


def test_lowest_missing_experts_are_replaced_when_candidates_run_short() -> None:
    spec = RouterSpec(family="t", kind="softmax", num_experts=8, top_k=3)
    probs = torch.tensor([[0.20, 0.19, 0.18, 0.17, 0.10, 0.08, 0.05, 0.03]])
    idx, w = _route(probs, spec)
    out = substitute(probs, idx, w, _mask(8, {3}), spec, alpha=0.2)  # S = 0.17, all low-score
    final = sorted(out.idx[0].tolist())
    assert final == [0, 1, 3], "the lowest missing expert (2) should give way"


def _v2_spec(num_experts: int, top_k: int, n_group: int, topk_group: int) -> RouterSpec:
    return RouterSpec(
        family="deepseek_v2",
        kind="softmax",
        num_experts=num_experts,
        top_k=top_k,
        scaling=2.5,
        group_score="max",
        n_group=n_group,
        topk_group=topk_group,
    )


def test_group_limited_substitutes_stay_in_allowed_groups() -> None:
    spec = _v2_spec(8, 2, n_group=2, topk_group=1)
    # group {0..3} wins; expert 4 (other group) outscores every allowed candidate
    probs = torch.tensor([[0.30, 0.16, 0.12, 0.10, 0.20, 0.06, 0.03, 0.03]])
    masked = probs.masked_fill(~_allowed(probs, spec), 0.0)
    idx, w = _route(masked, spec)
    assert sorted(idx[0].tolist()) == [0, 1]
    out = substitute(probs, idx, w, _mask(8, {0, 4}), spec, alpha=0.6)
    assert out.count == 0, "a substitute from a disallowed group was used"
    out = substitute(probs, idx, w, _mask(8, {0, 3, 4}), spec, alpha=0.6)
    assert sorted(out.idx[0].tolist()) == [0, 3]
    assert out.weights[out.substituted].item() == pytest.approx(0.10 * 2.5)


def test_group_limited_random_tables_keep_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    spec = _v2_spec(16, 3, n_group=4, topk_group=2)
    total = 0
    for _ in range(10):
        probs = torch.randn(6, 16, generator=gen).softmax(-1)
        allowed = _allowed(probs, spec)
        idx, w = _route(probs.masked_fill(~allowed, 0.0), spec)
        out = substitute(probs, idx, w, torch.rand(16, generator=gen) < 0.5, spec, alpha=0.6)
        total += out.count
        assert allowed.gather(1, out.idx).all(), "substitute outside the token's groups"
        expect = probs.gather(1, out.idx)[out.substituted] * 2.5
        assert torch.allclose(out.weights[out.substituted], expect)
    assert total > 0, "random tables never substituted: the test proves nothing"


def _v3_route(logits: torch.Tensor, bias: torch.Tensor, spec: RouterSpec) -> tuple:
    scores = logits.sigmoid()
    choice = scores + bias
    choice = choice.masked_fill(~_allowed(choice, spec), float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * spec.scaling
    return scores, idx, w


def test_deepseek_v3_bands_on_biased_score_weights_from_sigmoid() -> None:
    spec = RouterSpec(
        family="deepseek_v3",
        kind="sigmoid",
        num_experts=8,
        top_k=2,
        norm_topk_prob=True,
        scaling=2.5,
        group_score="top2_sum",
        n_group=2,
        topk_group=1,
    )
    logits = torch.tensor([[2.0, 1.0, 0.9, 0.0, 3.0, -1.0, -1.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])  # pushes group 1 out
    scores, idx, w = _v3_route(logits, bias, spec)
    assert sorted(idx[0].tolist()) == [0, 1]
    out = substitute(scores, idx, w, _mask(8, {0, 2, 4}), spec, alpha=0.2, bias=bias)
    assert sorted(out.idx[0].tolist()) == [0, 2], "expert 4 is outside the allowed group"
    slot = out.idx[0].tolist().index(2)
    expect = scores[0, 2] / (scores[0, 0] + scores[0, 1]) * 2.5
    assert out.weights[0, slot].item() == pytest.approx(expect.item(), rel=1e-6)
    # pushing expert 2 below the band by its bias removes the substitution
    lower = bias.clone()
    lower[2] = -0.3
    assert substitute(scores, idx, w, _mask(8, {0, 2}), spec, 0.2, bias=lower).count == 0
    assert substitute(scores, idx, w, _mask(8, {0, 2}), spec, 0.2, bias=bias).count == 1


def test_softmax_over_top_k_equals_renormalised_softmax() -> None:
    logits = torch.tensor([[1.5, 0.2, 1.3, -0.4, 0.9, 0.1]])
    spec = spec_from_config(
        SimpleNamespace(model_type="gpt_oss", num_local_experts=6, num_experts_per_tok=2)
    )
    top_logits, idx = logits.topk(2, dim=-1)
    w = top_logits.softmax(-1)  # GPT-OSS routing
    probs = affinities(logits, spec)
    assert torch.allclose(_route(probs, spec)[1], w)
    out = substitute(probs, idx, w, _mask(6, {0, 4}), spec, 0.6, weight_mode="own_renorm")
    final_logits = logits.gather(1, out.idx)
    assert torch.allclose(out.weights, final_logits.softmax(-1))


def test_sparsemixer_is_refused() -> None:
    config = SimpleNamespace(model_type="phimoe", num_local_experts=16, num_experts_per_tok=2)
    spec = spec_from_config(config)
    probs = torch.rand(1, 16).softmax(-1)
    idx, w = probs.topk(2)
    with pytest.raises(SubstitutionUnsupportedError, match="sparsemixer"):
        substitute(probs, idx, w, torch.ones(16, dtype=torch.bool), spec, alpha=0.2)
    with pytest.raises(SubstitutionUnsupportedError, match="model type 'dbrx'"):
        spec_from_config(SimpleNamespace(model_type="dbrx"))


def test_specs_from_real_configs() -> None:
    from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, Qwen2MoeConfig

    assert spec_from_config(MixtralConfig()).norm_topk_prob
    qwen = spec_from_config(Qwen2MoeConfig())
    assert (qwen.num_experts, qwen.top_k, qwen.norm_topk_prob) == (60, 4, False)
    v2 = spec_from_config(
        DeepseekV2Config(
            num_experts_per_tok=6,
            topk_method="group_limited_greedy",
            n_group=8,
            topk_group=3,
            routed_scaling_factor=16.0,
        )
    )
    assert (v2.group_score, v2.n_group, v2.topk_group, v2.scaling) == ("max", 8, 3, 16.0)
    v3 = spec_from_config(DeepseekV3Config())
    assert (v3.kind, v3.group_score, v3.num_experts) == ("sigmoid", "top2_sum", 256)


def test_bad_inputs_are_refused_with_a_message() -> None:
    idx, w = _route(TABLE, MIXTRAL)
    resident = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="alpha"):
        substitute(TABLE, idx, w, resident, MIXTRAL, alpha=0.7)
    with pytest.raises(ValueError, match="scores must be"):
        substitute(TABLE[:, :5], idx, w, resident, MIXTRAL, alpha=0.2)
    with pytest.raises(ValueError, match="resident"):
        substitute(TABLE, idx, w, torch.zeros(5, dtype=torch.bool), MIXTRAL, alpha=0.2)
    with pytest.raises(ValueError, match="weight_mode"):
        substitute(TABLE, idx, w, resident, MIXTRAL, 0.2, weight_mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(family="t", kind="softmax", num_experts=2, top_k=2)
    with pytest.raises(ValueError, match="groups"):
        RouterSpec(family="t", kind="softmax", num_experts=6, top_k=2, group_score="max", n_group=4)


def test_bf16_weights_keep_their_dtype() -> None:
    probs = TABLE
    idx, _ = _route(probs, QWEN)
    w = probs.gather(1, idx).to(torch.bfloat16)
    out = substitute(probs, idx, w, _mask(6, {0, 2}), QWEN, alpha=0.3)
    assert out.weights.dtype == torch.bfloat16 and out.count == 1
