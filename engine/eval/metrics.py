"""Teacher-forced comparison of a test model's logits against a reference model's logits.

Pure torch functions on logits already computed; nothing here runs a model. Every metric is
computed in fp32 whatever the logits' dtype. Legend: ``T`` positions, ``V`` vocabulary.

- top-1 agreement: share of positions where both argmaxes are the same token;
- KL(reference || test) per position, from the log-softmax of each side, averaged;
- NLL of the true next tokens and perplexity ``exp(mean NLL)``, for each side, and their
  deltas (the perplexity delta is relative: ``ppl / ppl_ref - 1``).

``ComparisonAccumulator`` gathers the same sums chunk by chunk, so long texts never need all
logits in memory at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError


def _check_pair(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> None:
    if ref_logits.dim() != 2 or test_logits.dim() != 2:
        raise InvalidRequestError(
            f"logits must be [positions, vocab]; got {tuple(ref_logits.shape)} "
            f"and {tuple(test_logits.shape)}"
        )
    if ref_logits.shape != test_logits.shape:
        raise InvalidRequestError(
            f"reference and test logits differ in shape: {tuple(ref_logits.shape)} "
            f"vs {tuple(test_logits.shape)}"
        )


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise InvalidRequestError(
            f"targets must be [positions] = [{logits.shape[0]}]; got {tuple(targets.shape)}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise InvalidRequestError("a target token id lies outside the vocabulary")


def top1_matches(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """Per position, whether both sides put the same token first. ``[T]`` bool."""
    _check_pair(ref_logits, test_logits)
    return ref_logits.float().argmax(-1) == test_logits.float().argmax(-1)  # [T]


def kl_per_position(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_test) in nats per position, fp32, clamped at 0 against rounding. ``[T]``."""
    _check_pair(ref_logits, test_logits)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)  # [T, V]
    test_logp = torch.log_softmax(test_logits.float(), dim=-1)  # [T, V]
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)  # [T]
    return kl.clamp_min(0.0)


def nll_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each true next token, fp32 nats. ``[T]``."""
    if logits.dim() != 2:
        raise InvalidRequestError(f"logits must be [positions, vocab]; got {tuple(logits.shape)}")
    _check_targets(logits, targets)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [T]


def perplexity(mean_nll: float) -> float:
    """``exp(mean NLL)``; infinite rather than an overflow error for absurd NLLs."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


@dataclass(frozen=True)
class Comparison:
    """Teacher-forced fidelity of a test run against the reference on the same tokens."""

    positions: int
    top1_agreement: float
    kl: float  # mean KL(reference || test), nats per position
    nll: float  # test's mean NLL of the true next tokens
    nll_ref: float

    @property
    def ppl(self) -> float:
        return perplexity(self.nll)

    @property
    def ppl_ref(self) -> float:
        return perplexity(self.nll_ref)

    @property
    def nll_delta(self) -> float:
        return self.nll - self.nll_ref

    @property
    def ppl_delta(self) -> float:
        """Relative perplexity change: 0.02 means 2% worse than the reference."""
        return self.ppl / self.ppl_ref - 1.0 if self.ppl_ref > 0 else 0.0


class ComparisonAccumulator:
    """Sums of the per-position metrics over chunks of ``(ref, test, targets)``."""

    def __init__(self) -> None:
        self.positions = 0
        self._matches = 0
        self._kl = 0.0
        self._nll = 0.0
        self._nll_ref = 0.0

    def add(
        self, ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Account one chunk: ``ref_logits``/``test_logits`` ``[T, V]``, ``targets`` ``[T]``."""
        self._matches += int(top1_matches(ref_logits, test_logits).sum())
        self._kl += float(kl_per_position(ref_logits, test_logits).double().sum())
        self._nll += float(nll_per_position(test_logits, targets).double().sum())
        self._nll_ref += float(nll_per_position(ref_logits, targets).double().sum())
        self.positions += int(targets.shape[0])

    def result(self) -> Comparison:
        if self.positions == 0:
            raise InvalidRequestError("nothing to compare: no positions were scored")
        count = self.positions
        return Comparison(
            positions=count,
            top1_agreement=self._matches / count,
            kl=self._kl / count,
            nll=self._nll / count,
            nll_ref=self._nll_ref / count,
        )


def compare(
    ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor
) -> Comparison:
    """One-shot comparison of ``[T, V]`` logits on the true next tokens ``[T]``."""
    accumulator = ComparisonAccumulator()
    accumulator.add(ref_logits, test_logits, targets)
    return accumulator.result()
