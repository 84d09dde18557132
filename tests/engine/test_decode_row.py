"""The decode planner on Python lists decides what the numpy host plan decides.

``decode_row`` is the engine's path for one token without group limits or bias; the numpy
path (``plan.classify_host`` / ``substitute_host`` / ``top_score_ranked``) is the reference.
Random score rows at several alphas and residencies, plus rows with tied scores and rows
where every expert is chosen, must give the same bands, swaps, weights and prefetch ranking;
``mix_row`` must give ``mix_weights``' fp32 weights bit for bit in every mode it takes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.offload.decode_row import mix_row, ranked_top, row_bands, substitute_row
from engine.offload.plan import (
    HostRouting,
    classify_host,
    mix_weights,
    model_top_k_host,
    substitute_host,
    top_score_ranked,
)
from engine.offload.substitution import WEIGHT_MODES, RouterSpec

SPECS = [
    RouterSpec("qwen2_moe", "softmax", num_experts=32, top_k=8, norm_topk_prob=True),
    RouterSpec("mixtral", "softmax", num_experts=8, top_k=2, norm_topk_prob=True),
    RouterSpec("qwen2_moe", "softmax", num_experts=16, top_k=4),
    RouterSpec("deepseek_v2", "softmax", num_experts=16, top_k=4, scaling=2.5),
    RouterSpec("mixtral", "softmax", num_experts=16, top_k=4, norm_topk_prob=True, scaling=1.7),
]
ALPHAS = (0.0, 0.05, 0.2, 0.4, 0.6)


def _row(spec: RouterSpec, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=spec.num_experts) * 2
    if ties:
        logits = np.round(logits)  # many equal scores
    scores = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)[None, :]  # [1, E]
    idx = model_top_k_host(scores, spec)  # [1, k]
    resident = rng.random(spec.num_experts) < 0.5
    return scores, idx, resident


CASES = list(itertools.product(range(len(SPECS)), ALPHAS, (False, True)))


@pytest.mark.parametrize(("which", "alpha", "ties"), CASES)
def test_row_planner_equals_the_numpy_plan(which: int, alpha: float, ties: bool) -> None:
    spec = SPECS[which]
    swaps = 0
    for seed in range(40):
        scores, idx, resident = _row(spec, seed, ties)
        where = f"spec {which} alpha={alpha} ties={ties} seed={seed}"
        bands = classify_host(scores, idx, spec, alpha, None)
        row = row_bands(scores[0].tolist(), idx[0].tolist(), alpha)
        assert row.top() == bands.top_score[0].tolist(), where
        assert row.candidates() == np.flatnonzero(bands.candidate[0]).tolist(), where
        weights = scores[:, idx[0]].astype(np.float32)
        host = HostRouting(scores, idx, weights)
        want = substitute_host(host, resident, spec, alpha, bands=bands)
        swap = substitute_row(row, resident.tolist()) if alpha > 0 else None
        assert (swap is None) == (want is None), where
        if want is not None and swap is not None:
            swaps += 1
            new, flags = np.array([swap[0]]), np.array([swap[1]])
            assert np.array_equal(new, want.idx) and np.array_equal(flags, want.substituted), where
            assert np.array_equal(mix_weights(host, new, flags, spec, "own"), want.weights), where
            for mode in WEIGHT_MODES:
                mixed = mix_row(scores[0], idx[0], weights[0], swap, spec, mode)  # type: ignore[arg-type]
                reference = mix_weights(host, new, flags, spec, mode)  # type: ignore[arg-type]
                assert mixed is None or np.array_equal(mixed[None, :], reference), (where, mode)
                assert mixed is not None or (mode == "own_renorm" and spec.norm_topk_prob), mode
        ranked, _ = ranked_top(scores[0], spec.top_k, alpha)
        top_idx = model_top_k_host(scores, spec)
        assert ranked == top_score_ranked(
            classify_host(scores, top_idx, spec, alpha, None), top_idx
        )
    assert swaps > 0 or alpha < 0.1, "the cases must exercise substitution"


def test_every_expert_chosen_is_all_top_score_and_no_candidate() -> None:
    row = row_bands([0.5, 0.3, 0.2], [0, 1, 2], 0.4)
    assert row.top() == [True, True, True] and row.candidates() == []
    assert substitute_row(row, [False, False, False]) is None
    assert ranked_top(np.array([0.5, 0.3, 0.2], np.float32), 3, 0.4)[0] == [0, 1, 2]
