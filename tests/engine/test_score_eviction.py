"""Score-aware eviction on hand-built score tables, next to LRU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.offload.eviction import LRUPolicy
from engine.offload.score_eviction import ScoreEviction, make_policy, scale_scores


def _scores(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_keeps_a_high_scoring_unselected_expert_that_lru_evicts() -> None:
    score, lru = ScoreEviction(window=4), LRUPolicy()
    for policy in (score, lru):
        policy.record_use((0, 2), step=0)  # expert 2 used once, long ago
        for step in range(1, 6):
            policy.record_use((0, 1), step)  # expert 1 selected every step...
            # ...but expert 2 keeps scoring high without being selected
            policy.record_scores(0, _scores(0.40, 0.15, 0.35, 0.10), step)
    resident = [(0, 1), (0, 2)]
    assert lru.victim(resident, set()) == (0, 2)
    assert score.victim(resident, set()) == (0, 1)


def test_protected_experts_are_never_chosen() -> None:
    policy = ScoreEviction()
    policy.record_scores(0, _scores(0.7, 0.1, 0.2), step=0)
    assert policy.victim([(0, 0), (0, 1), (0, 2)], {(0, 1)}) == (0, 2)
    with pytest.raises(RuntimeError, match="protected"):
        policy.victim([(0, 1)], {(0, 1)})


def test_only_the_last_window_steps_count() -> None:
    policy = ScoreEviction(window=2)
    policy.record_scores(0, _scores(0.95, 0.05), step=0)  # falls out of the window
    policy.record_scores(0, _scores(0.4, 0.6), step=1)
    policy.record_scores(0, _scores(0.4, 0.6), step=2)
    assert policy.victim([(0, 0), (0, 1)], set()) == (0, 0)
    wide = ScoreEviction(window=3)
    for step, vector in enumerate([(0.95, 0.05), (0.4, 0.6), (0.4, 0.6)]):
        wide.record_scores(0, _scores(*vector), step)
    assert wide.victim([(0, 0), (0, 1)], set()) == (0, 1)  # means 0.58 vs 0.42


def test_reports_within_one_step_are_averaged_not_stacked() -> None:
    policy = ScoreEviction(window=2)
    policy.record_scores(0, _scores(0.9, 0.1), step=0)
    policy.record_scores(0, _scores(0.5, 0.5), step=1)
    policy.record_scores(0, _scores(0.1, 0.9), step=1)  # same step: mean (0.3, 0.7)
    assert policy.scaled_scores(0) == pytest.approx([0.6 / 0.5, 0.4 / 0.5])


def test_global_pool_compares_layers_on_a_common_scale() -> None:
    # layer 0 has 4 experts (average 0.25), layer 1 has 8 (average 0.125)
    layer0 = _scores(0.20, 0.30, 0.25, 0.25)
    layer1 = torch.full((8,), 0.125)
    resident = [(0, 0), (1, 3)]
    for scale, expect in (("raw", (1, 3)), ("relative", (0, 0)), ("rank", (0, 0))):
        policy = ScoreEviction(scale=scale)  # type: ignore[arg-type]
        policy.record_scores(0, layer0, step=0)
        policy.record_scores(1, layer1, step=0)
        assert policy.victim(resident, set()) == expect, scale


def test_unscored_layers_count_as_average_and_ties_fall_back_to_recency() -> None:
    policy = ScoreEviction()
    policy.record_scores(0, _scores(0.5, 0.5), step=0)  # relative 1.0 each
    policy.record_use((0, 1), step=0)
    policy.record_use((0, 0), step=1)
    policy.record_use((5, 0), step=2)  # layer 5 never scored: neutral 1.0
    assert policy.victim([(0, 0), (0, 1), (5, 0)], set()) == (0, 1)
    policy.forget((0, 1))
    assert policy.victim([(0, 0), (0, 1), (5, 0)], set()) == (0, 1)


def test_scale_functions() -> None:
    mean = _scores(0.1, 0.3, 0.2)
    assert scale_scores(mean, "relative").tolist() == pytest.approx([0.5, 1.5, 1.0])
    assert scale_scores(mean, "rank").tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert scale_scores(torch.zeros(3), "relative").tolist() == [1.0, 1.0, 1.0]


def test_factory_and_bad_arguments() -> None:
    assert make_policy(5).window == 5
    with pytest.raises(ValueError, match="window"):
        ScoreEviction(window=0)
    with pytest.raises(ValueError, match="scale"):
        ScoreEviction(scale="log")  # type: ignore[arg-type]


def test_vectorised_victim_matches_the_reference_rule() -> None:
    """``victim_in`` (residency masks, what the cache calls) picks what ``victim`` picks."""
    import numpy as np

    rng = np.random.default_rng(0)
    for trial in range(40):
        policy = make_policy(window=3, scale=("relative", "rank", "raw")[trial % 3])
        layers = [0, 2, 5]
        table = rng.random((3, 6)) < 0.6
        masks = dict(zip(layers, table, strict=True))
        for step in range(4):
            for layer in (0, 2):  # layer 5 never reports: its experts rank as average
                policy.record_scores(layer, rng.random(6).astype(np.float32), step)
            for key in [(0, 1), (2, 3), (5, 0), (0, 4)][: step + 1]:
                policy.record_use(key, step)
        resident = [(layer, int(e)) for layer, mask in masks.items() for e in np.flatnonzero(mask)]
        if len(resident) < 2:
            continue
        protected = {resident[0]}
        assert policy.victim_in(layers, table, protected) == policy.victim(resident, protected)


def test_the_window_mean_is_the_oldest_first_float64_mean_bit_for_bit() -> None:
    """One stacked reduction gives what adding the window's vectors in turn gives."""
    from engine.offload.score_eviction import _LayerWindow

    rng = np.random.default_rng(1)
    for trial in range(200):
        window = _LayerWindow(int(rng.integers(1, 9)))
        for step in range(int(rng.integers(1, 12))):
            window.add((rng.random(32) * 10.0 ** rng.integers(-4, 4)).astype(np.float32), step)
        vectors = list(window.vectors)
        total = vectors[0].astype(np.float64)
        for vector in vectors[1:]:
            total = total + vector
        expected = (total / len(vectors)).astype(np.float32)
        assert np.array_equal(window.mean(), expected), trial
