"""Top-score prefetch (SMoE): predict layer i+1's top-score experts while layer i runs.

Pure policy and accounting. The predictor follows the released code: it feeds layer i's
(partial) output hidden state, through layer i+1's post-attention norm when given, to layer
i+1's router, skipping layer i+1's attention. Of the predicted routing only the *top-score*
experts (above the upper band edge at the current alpha; all selected experts at alpha 0) are
worth copying: low-score ones are left to substitution. Resident ones need no copy. The
mechanism starts the copies (a copy stream on CUDA) and reports back what was used.

Accounting: precision is the share of predicted top-score experts that turned out top-score,
recall the share of actual top-score experts that were predicted, and ``used`` the share of
issued copies whose expert the layer then computed (the paper reports 82% and 95%).

Legend: T tokens, E experts, H hidden size, k experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.offload.families import fp32
from engine.offload.substitution import (
    RouterSpec,
    affinities,
    allowed_experts,
    choice_scores,
    classify,
)

Norm = Callable[[torch.Tensor], torch.Tensor]


def predict_scores(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    spec: RouterSpec,
    *,
    norm: Norm | None = None,
    router_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer i+1's predicted pre-top-k affinities [T, E] from layer i's output [T, H]."""
    x = hidden if norm is None else norm(hidden)  # [T, H]
    x = fp32(x.reshape(-1, x.shape[-1]))
    bias = None if router_bias is None else fp32(router_bias)
    logits = F.linear(x, fp32(router_weight), bias)  # [T, E]
    if spec.kind == "sparsemixer":
        return logits.softmax(dim=-1)  # ranking only: PhiMoE picks by logits
    return affinities(logits, spec)


@dataclass(frozen=True)
class FoldedRouter:
    """The predictor of one layer with its RMS norm folded into the router: two to five ops.

    ``norm(x) @ W.T`` with ``norm(x) = g * x / rms(x)`` equals ``(x @ (W * g).T) / rms(x)``; the
    per-token ``rms`` is ``|x| / sqrt(H)`` (the norm's epsilon left out: it only matters for a
    near-zero state, clamped here). So a prediction from the raw state is a matrix product, a
    vector norm, its clamp, one division and the family's softmax (and the router's bias, if
    it has one), instead of the norm module's eight ops and the router's.

    ``normed``: the input is already the output of an RMS norm of the *same* state with gain
    ``g0`` (the current MoE layer's post-attention norm, whose output the engine sees anyway):
    then ``norm(x) = (g / g0) * norm0(x)`` and the prediction is one matrix product and the
    softmax. It is a *prediction* (it only chooses what to copy early): rounding may differ
    from the norm module in the last bits, never what the layer computes.
    """

    weight: torch.Tensor  # [E, H] fp32: router weight * gain * sqrt(H), or * gain / g0
    bias: torch.Tensor | None  # [E] fp32
    spec: RouterSpec
    normed: bool = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = fp32(hidden)  # [T, H]
        if self.normed:
            return affinities(F.linear(x, self.weight, self.bias), self.spec)  # [T, E]
        logits = F.linear(x, self.weight)  # [T, E], scaled by |x| / sqrt(H)
        size = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [T, 1]
        logits = logits.div_(size.clamp_min_(FOLD_TINY))
        if self.bias is not None:  # the router's bias is not scaled by the norm
            logits = logits.add_(self.bias)
        return affinities(logits, self.spec)


FOLD_TINY = 1e-12  # smallest |x| divided by (a zero state would otherwise give NaN scores)
FOLD_TOLERANCE = 1e-4  # the probe's largest difference from the norm module (fp32 gain)
FOLD_TOLERANCE_16 = 3e-2  # the same for a 16-bit gain (bf16 keeps 8 bits of mantissa)


def fold_router(
    norm: nn.Module | None,
    router_weight: torch.Tensor,
    spec: RouterSpec,
    router_bias: torch.Tensor | None = None,
) -> FoldedRouter | None:
    """The folded predictor when ``norm`` is a plain RMS norm (checked on a probe); else None.

    The probe compares the module's output with ``g * x / rms(x)`` on random rows, so a norm
    that centres (LayerNorm), offsets its gain (``1 + g``) or does anything else is refused and
    the caller keeps ``predict_scores`` with the module.
    """
    hidden = router_weight.shape[-1]
    gain = _rms_gain(norm, hidden) if spec.kind != "sparsemixer" else None
    if gain is None:
        return None
    with torch.no_grad():
        weight = fp32(router_weight.detach()) * gain * math.sqrt(hidden)  # [E, H]
    return FoldedRouter(weight.contiguous(), _bias(router_bias), spec)


def fold_router_after(
    norm_before: nn.Module | None,
    norm: nn.Module | None,
    router_weight: torch.Tensor,
    spec: RouterSpec,
    router_bias: torch.Tensor | None = None,
) -> FoldedRouter | None:
    """The predictor that reads ``norm_before``'s output (``normed``), or None.

    Both norms must be plain RMS norms that agree up to their gains (the same epsilon: the
    probe checks ``norm(x) == (g / g0) * norm_before(x)``), and ``norm_before``'s gain may have
    no zero (it is divided by).
    """
    hidden = router_weight.shape[-1]
    if spec.kind == "sparsemixer":
        return None
    before, gain = _rms_gain(norm_before, hidden), _rms_gain(norm, hidden)
    if before is None or gain is None or norm is None or norm_before is None:
        return None
    if bool((before.abs() <= FOLD_TINY * before.abs().max()).any()):
        return None
    ratio = gain / before  # [H]
    with torch.no_grad():
        probe = _probe(hidden, norm_before)
        expected, got = fp32(norm(probe)), ratio * fp32(norm_before(probe))
        tolerance = _tolerance(norm_before.weight)
        if not torch.allclose(expected, got, rtol=tolerance, atol=tolerance):
            return None
        weight = fp32(router_weight.detach()) * ratio  # [E, H]
    return FoldedRouter(weight.contiguous(), _bias(router_bias), spec, normed=True)


def _rms_gain(norm: nn.Module | None, hidden: int) -> torch.Tensor | None:
    """``norm``'s gain in fp32 when it computes ``g * x / rms(x)`` on a probe; else None."""
    gain = getattr(norm, "weight", None) if norm is not None else None
    if norm is None or not isinstance(gain, torch.Tensor) or tuple(gain.shape) != (hidden,):
        return None
    with torch.no_grad():
        gain32 = fp32(gain.detach())
        probe = _probe(hidden, norm)
        expected, x = fp32(norm(probe)), fp32(probe)
        folded = gain32 * x / x.pow(2).mean(-1, keepdim=True).sqrt()
        tolerance = _tolerance(gain)
        if not torch.allclose(expected, folded, rtol=tolerance, atol=tolerance):
            return None
    return gain32


def _probe(hidden: int, norm: nn.Module) -> torch.Tensor:
    """Four random rows on the norm's device and in its dtype."""
    gain: Any = norm.weight
    probe = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
    return probe.to(gain.device, gain.dtype)


def _tolerance(gain: Any) -> float:
    return FOLD_TOLERANCE if gain.dtype == torch.float32 else FOLD_TOLERANCE_16


def _bias(router_bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if router_bias is None else fp32(router_bias.detach())


def model_top_k(
    scores: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The experts the model itself would choose from these affinities: [T, k]."""
    choice = choice_scores(scores, bias)  # [T, E]
    allowed = allowed_experts(choice, spec)
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    return choice.topk(spec.top_k, dim=-1).indices  # [T, k]


def top_score_experts(
    scores: torch.Tensor,
    top_idx: torch.Tensor,
    spec: RouterSpec,
    alpha: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts that are top-score for at least one token, best first: [n] int64."""
    if spec.substitutable:
        top = classify(scores, top_idx, spec, alpha, bias).top_score  # [T, k]
    else:
        top = torch.ones_like(top_idx, dtype=torch.bool)
    choice = choice_scores(scores.float(), bias).gather(1, top_idx.long())  # [T, k]
    best = torch.full((spec.num_experts,), float("-inf"), device=scores.device)
    best.scatter_reduce_(0, top_idx.long()[top], choice[top], reduce="amax")  # [E]
    experts = torch.nonzero(torch.isfinite(best)).flatten()
    return experts[best[experts].argsort(descending=True)]


def plan_prefetch(
    predicted_scores: torch.Tensor,
    resident: torch.Tensor,
    spec: RouterSpec,
    alpha: float,
    *,
    bias: torch.Tensor | None = None,
    limit: int | None = None,
) -> list[int]:
    """Predicted top-score experts of the next layer that are not resident, best first."""
    if limit is not None and limit < 0:
        raise ValueError(f"the prefetch limit must be >= 0; got {limit}")
    top_idx = model_top_k(predicted_scores, spec, bias)
    experts = top_score_experts(predicted_scores, top_idx, spec, alpha, bias)
    missing = experts[~resident.to(experts.device)[experts]].tolist()
    return missing if limit is None else missing[:limit]


@dataclass
class PrefetchAccount:
    """Running counts for prefetch precision, recall and usefulness."""

    predicted: int = 0  # predicted top-score experts (resident or not)
    correct: int = 0  # of those, actual top-score experts
    actual: int = 0  # actual top-score experts
    issued: int = 0  # copies started by the prefetcher
    used: int = 0  # issued copies the layer then computed

    def observe(
        self,
        predicted: Collection[int],
        actual_top_score: Collection[int],
        issued: Collection[int] = (),
        computed: Collection[int] = (),
    ) -> None:
        """Record one layer-step: predictions, the truth, copies issued, experts computed."""
        predicted_set, actual_set, issued_set = set(predicted), set(actual_top_score), set(issued)
        self.add(
            len(predicted_set),
            len(actual_set),
            len(predicted_set & actual_set),
            len(issued_set),
            len(issued_set & set(computed)),
        )

    def add(self, predicted: int, actual: int, correct: int, issued: int, used: int) -> None:
        """Record one layer-step from counts (``observe`` with the set sizes done by the
        caller: predicted, actual, their overlap, copies issued, and those computed)."""
        self.predicted += predicted
        self.actual += actual
        self.correct += correct
        self.issued += issued
        self.used += used

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0

    @property
    def used_fraction(self) -> float:
        return self.used / self.issued if self.issued else 0.0
