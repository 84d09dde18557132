"""Sampling: repetition penalty, top-k and top-p masks, greedy, and seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import SamplingConfig
from engine.runtime.sampling import Sampler, apply_repetition_penalty, top_k_mask, top_p_mask

NEG = float("-inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -1.0, 3.0, -4.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0, -4.0], "only seen tokens change, toward less likely"
    assert logits.tolist() == [2.0, -1.0, 3.0, -4.0], "the input is not modified"


def test_repetition_penalty_one_is_identity():
    logits = torch.tensor([2.0, -1.0])
    assert apply_repetition_penalty(logits, [0, 1], 1.0) is logits


def test_top_k_keeps_the_k_largest():
    out = top_k_mask(torch.tensor([1.0, 4.0, 3.0, 2.0]), 2)
    assert out.tolist() == [NEG, 4.0, 3.0, NEG]
    assert top_k_mask(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0], "0 disables top-k"


@pytest.mark.parametrize(("p", "kept"), [(0.5, 1), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    out = top_p_mask(torch.log(probs), p)
    survivors = sorted(torch.nonzero(out > NEG).flatten().tolist())
    expected = sorted([1, 3, 0, 2][:kept])
    assert survivors == expected, f"p={p} keeps the {kept} most likely"


def test_greedy_ignores_temperature_and_masks():
    logits = torch.tensor([0.0, 5.0, 4.9])
    sampler = Sampler(SamplingConfig(greedy=True, temperature=5.0, top_k=1, repetition_penalty=1.0))
    assert all(sampler.pick(logits, []) == 1 for _ in range(20))


def test_greedy_applies_repetition_penalty():
    sampler = Sampler(SamplingConfig(greedy=True, repetition_penalty=2.0))
    assert sampler.pick(torch.tensor([0.0, 5.0, 4.0]), [1]) == 2, "5/2 < 4: the seen token loses"


def test_zero_temperature_is_greedy():
    sampler = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=1.0))
    assert sampler.pick(torch.tensor([0.0, 1.0, 3.0]), []) == 2


def draws(seed: int, n: int = 30) -> list[int]:
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, seed=seed))
    logits = torch.zeros(50)
    return [sampler.pick(logits, []) for _ in range(n)]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_sampling_respects_top_k():
    sampler = Sampler(
        SamplingConfig(temperature=1.0, top_p=1.0, top_k=2, seed=0, repetition_penalty=1.0)
    )
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7])
    picks = {sampler.pick(logits, []) for _ in range(200)}
    assert picks == {0, 1}


def test_temperature_sharpens_distribution():
    logits = torch.tensor([1.0, 0.0])
    cold = Sampler(
        SamplingConfig(temperature=0.1, top_p=1.0, top_k=0, seed=0, repetition_penalty=1.0)
    )
    picks = [cold.pick(logits, []) for _ in range(200)]
    assert picks.count(0) / 200 > 1 / (1 + math.exp(-5)) - 0.05, "T=0.1 makes token 0 near-certain"
