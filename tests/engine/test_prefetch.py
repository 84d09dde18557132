"""Top-score prefetch prediction and its precision/recall accounting."""

from __future__ import annotations

import pytest
import torch

from engine.eval.opcount import OpCounter
from engine.offload.prefetch import (
    PrefetchAccount,
    fold_router,
    fold_router_after,
    model_top_k,
    plan_prefetch,
    predict_scores,
    top_score_experts,
)
from engine.offload.substitution import RouterSpec

SPEC = RouterSpec(family="qwen2_moe", kind="softmax", num_experts=8, top_k=2)


def test_predicted_scores_are_the_next_routers_softmax_of_the_normed_state() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, generator=gen)
    weight = torch.randn(8, 16, generator=gen)
    norm = torch.nn.RMSNorm(16)
    scores = predict_scores(hidden, weight, SPEC, norm=norm)
    expect = (norm(hidden) @ weight.T).softmax(-1)
    assert torch.allclose(scores, expect, atol=1e-6)
    assert scores.shape == (3, 8) and scores.dtype == torch.float32


def test_folded_predictor_equals_the_norm_and_router_in_six_ops() -> None:
    """The RMS norm folded into the router predicts the same scores (to rounding), with the
    same top-k, in a fixed handful of ops whatever the norm module does."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 1, 16, generator=gen) * 3
    weight, bias = torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    folded = fold_router(norm, weight, SPEC, bias)
    assert folded is not None
    expect = predict_scores(hidden, weight, SPEC, norm=norm, router_bias=bias)  # [1, 8]
    with torch.inference_mode(), OpCounter() as counter:  # as the engine decodes
        got = folded(hidden)  # [1, 1, 8]
    assert torch.allclose(got.reshape(1, 8), expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.reshape(1, 8).topk(2).indices, expect.topk(2).indices)
    assert counter.ops == 6, counter.ops  # matmul, norm, clamp, divide, bias, softmax
    assert torch.isfinite(folded(torch.zeros(1, 16))).all()  # a zero state: no NaN scores


def test_the_next_layers_prediction_from_this_layers_normed_state_in_two_ops() -> None:
    """Reading the current layer's norm output, the next layer's norm is a per-channel ratio
    of gains: the prediction is one matrix product and the softmax."""
    gen = torch.Generator().manual_seed(2)
    mid = torch.randn(1, 16, generator=gen) * 2
    weight = torch.randn(8, 16, generator=gen)
    before, after = torch.nn.RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        before.weight.copy_(torch.rand(16, generator=gen) + 0.5)
        after.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    folded = fold_router_after(before, after, weight, SPEC)
    assert folded is not None and folded.normed
    expect = predict_scores(mid, weight, SPEC, norm=after)
    normed = before(mid).detach()  # what the engine's hook on this layer's norm keeps
    with torch.inference_mode(), OpCounter() as counter:
        got = folded(normed)
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert counter.ops == 2, counter.ops  # matmul, softmax
    with torch.no_grad():
        before.weight[3] = 0.0  # a zero gain cannot be divided by
    assert fold_router_after(before, after, weight, SPEC) is None
    other_eps = torch.nn.RMSNorm(16, eps=1.0)  # a different epsilon: not a ratio of gains
    assert fold_router_after(other_eps, after, weight, SPEC) is None


def test_a_norm_that_is_not_plain_rms_is_not_folded() -> None:
    weight = torch.randn(8, 16)
    assert fold_router(torch.nn.LayerNorm(16), weight, SPEC) is None  # centres its input
    assert fold_router(None, weight, SPEC) is None
    assert fold_router(torch.nn.RMSNorm(4), weight, SPEC) is None  # gain of the wrong width


def test_sigmoid_router_prediction_and_bias_in_choice() -> None:
    spec = RouterSpec(
        family="deepseek_v3",
        kind="sigmoid",
        num_experts=4,
        top_k=1,
        norm_topk_prob=True,
        group_score="top2_sum",
        n_group=1,
        topk_group=1,
    )
    hidden = torch.eye(4)
    scores = predict_scores(hidden, torch.eye(4) * 3, spec)
    assert torch.allclose(scores, (torch.eye(4) * 3).sigmoid())
    bias = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    assert model_top_k(scores[:1], spec, bias).item() != 0  # bias pushes expert 0 out


def test_plan_takes_only_non_resident_top_score_experts_best_first() -> None:
    scores = torch.tensor(
        [
            [0.50, 0.20, 0.18, 0.05, 0.03, 0.02, 0.01, 0.01],  # S = 0.18: 0 top, 1 low at 0.3
            [0.02, 0.01, 0.05, 0.60, 0.25, 0.03, 0.02, 0.02],  # S = 0.05: 3 and 4 top
        ]
    )
    nothing = torch.zeros(8, dtype=torch.bool)
    assert plan_prefetch(scores, nothing, SPEC, alpha=0.3) == [3, 0, 4]
    assert plan_prefetch(scores, nothing, SPEC, alpha=0.0) == [3, 0, 4, 1]
    resident = torch.zeros(8, dtype=torch.bool)
    resident[3] = True
    assert plan_prefetch(scores, resident, SPEC, alpha=0.3, limit=1) == [0]
    with pytest.raises(ValueError, match="limit"):
        plan_prefetch(scores, resident, SPEC, alpha=0.3, limit=-1)


def test_top_score_experts_for_unsubstitutable_router_are_the_selected_ones() -> None:
    spec = RouterSpec(family="phimoe", kind="sparsemixer", num_experts=4, top_k=2)
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    experts = top_score_experts(scores, torch.tensor([[1, 2]]), spec, alpha=0.3)
    assert experts.tolist() == [1, 2]


def test_perfect_prediction_has_full_precision_and_recall() -> None:
    gen = torch.Generator().manual_seed(1)
    account = PrefetchAccount()
    for _ in range(5):
        scores = torch.randn(1, 8, generator=gen).softmax(-1)
        truth = top_score_experts(scores, model_top_k(scores, SPEC), SPEC, 0.2).tolist()
        predicted = plan_prefetch(scores, torch.zeros(8, dtype=torch.bool), SPEC, 0.2)
        account.observe(predicted, truth, issued=predicted, computed=truth)
    assert account.precision == 1.0 and account.recall == 1.0 and account.used_fraction == 1.0


def test_account_arithmetic() -> None:
    account = PrefetchAccount()
    account.observe(predicted=[1, 2, 3, 4], actual_top_score=[2, 3, 5], issued=[1, 2], computed=[2])
    assert account.precision == pytest.approx(0.5)
    assert account.recall == pytest.approx(2 / 3)
    assert account.used_fraction == pytest.approx(0.5)
    assert PrefetchAccount().precision == 0.0
