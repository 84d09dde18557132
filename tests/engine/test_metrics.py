"""Teacher-forced comparison metrics: agreement, KL, NLL and perplexity on known logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.eval.metrics import (
    ComparisonAccumulator,
    compare,
    kl_per_position,
    nll_per_position,
    perplexity,
    top1_matches,
)


def test_identical_logits_agree_fully_with_zero_kl() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    result = compare(logits, logits.clone(), targets)
    assert result.top1_agreement == 1.0
    assert result.kl == 0.0
    assert result.nll == result.nll_ref
    assert result.ppl_delta == 0.0


def test_top1_agreement_counts_changed_argmax() -> None:
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    test = ref.clone()
    test[1] = torch.tensor([0.0, 1.0, 2.0])  # argmax 1 -> 2
    assert top1_matches(ref, test).tolist() == [True, False, True, True]
    assert compare(ref, test, torch.zeros(4, dtype=torch.long)).top1_agreement == 0.75


def test_kl_matches_closed_form_for_two_tokens() -> None:
    p, q = 0.8, 0.5
    ref = torch.tensor([[math.log(p), math.log(1 - p)]])
    test = torch.tensor([[math.log(q), math.log(1 - q)]])
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert kl_per_position(ref, test).item() == pytest.approx(expected, rel=1e-5)
    assert kl_per_position(test, ref).item() != pytest.approx(expected, rel=1e-3)  # direction


def test_kl_is_computed_in_fp32_from_half_logits() -> None:
    torch.manual_seed(1)
    ref = torch.randn(5, 50).to(torch.bfloat16)
    test = (ref.float() + 0.1 * torch.randn(5, 50)).to(torch.bfloat16)
    kl = kl_per_position(ref, test)
    assert kl.dtype == torch.float32
    assert (kl > 0).all()


def test_nll_and_perplexity_of_uniform_distribution() -> None:
    logits = torch.zeros(4, 10)  # uniform over 10 tokens
    nll = nll_per_position(logits, torch.tensor([0, 3, 9, 5]))
    assert torch.allclose(nll, torch.full((4,), math.log(10)))
    assert perplexity(float(nll.mean())) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf


def test_ppl_delta_is_relative_and_signed() -> None:
    targets = torch.tensor([0, 0])
    ref = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    worse = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    result = compare(ref, worse, targets)
    assert result.ppl > result.ppl_ref
    assert result.ppl_delta == pytest.approx(result.ppl / result.ppl_ref - 1)
    assert result.nll_delta > 0


def test_accumulator_over_chunks_equals_one_shot() -> None:
    torch.manual_seed(2)
    ref, test = torch.randn(12, 9), torch.randn(12, 9)
    targets = torch.randint(0, 9, (12,))
    accumulator = ComparisonAccumulator()
    for chunk in (slice(0, 5), slice(5, 6), slice(6, 12)):
        accumulator.add(ref[chunk], test[chunk], targets[chunk])
    whole, chunked = compare(ref, test, targets), accumulator.result()
    assert chunked.positions == 12
    assert chunked.top1_agreement == pytest.approx(whole.top1_agreement)
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-5)
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-5)


def test_bad_shapes_and_targets_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="differ in shape"):
        compare(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidRequestError, match=r"\[positions, vocab\]"):
        top1_matches(torch.zeros(4), torch.zeros(4))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        nll_per_position(torch.zeros(2, 4), torch.tensor([1, 4]))
    with pytest.raises(InvalidRequestError, match="targets must be"):
        nll_per_position(torch.zeros(2, 4), torch.tensor([1]))
    with pytest.raises(InvalidRequestError, match="no positions"):
        ComparisonAccumulator().result()
