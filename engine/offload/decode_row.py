"""The decode planner: one token's Algorithm 1 and prefetch choice on plain Python lists.

A decode step routes one token per MoE layer. For that case (no group limits, no correction
bias: the Mixtral, Qwen, OLMoE and SmolLM2 MoE routers) this module decides what
``plan.classify_host`` / ``plan.substitute_host`` / ``plan.top_score_ranked`` decide, from
one ``tolist()`` of the layer's score row, with Python ints and floats instead of a dozen
small numpy calls per layer: the bands once (``RowBands``, shared by substitution and the
prefetch accounting), the swaps, and the predicted top-score experts best first. The band
edges are computed in fp32 exactly as the numpy path computes them (fp32 values compare the
same as Python floats), so the decisions are equal; ``tests/engine/test_decode_row.py``
checks them against the numpy path on random rows. The weights of a substituted row are
mixed by ``mix_row``: the router's weights with each substitute's own weight written in, the
same fp32 operations as ``plan.mix_weights`` (bit for bit, tested) without its array passes;
``own_renorm`` (every weight of the row changes) is left to ``plan.mix_weights``.

Pure: rows and residency in, decisions out. Legend: E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.offload.substitution import RouterSpec, WeightMode

F32 = np.float32
INF = float("inf")


@dataclass(slots=True)
class RowBands:
    """One token's importance bands: its score row, chosen experts and the two band edges."""

    row: list[float]  # [E] scores (fp32 values)
    rest: list[float]  # [E] the row with the chosen experts at -inf
    chosen: list[int]  # [k] the router's top-k, in its order
    upper: float  # chosen experts above this are top-score
    lower: float  # unselected experts above this are candidates
    finite: bool  # False when every expert is chosen (no candidates, all top-score)

    def top(self) -> list[bool]:
        """[k] which chosen experts are top-score."""
        if not self.finite:
            return [True] * len(self.chosen)
        return [self.row[e] > self.upper for e in self.chosen]

    def top_set(self) -> set[int]:
        """Experts that are top-score for this token (the prefetch's truth)."""
        return {e for e, is_top in zip(self.chosen, self.top(), strict=True) if is_top}

    def candidates(self) -> list[int]:
        """Unselected experts inside the band, ascending id."""
        if not self.finite:
            return []
        lower = self.lower
        return [e for e, v in enumerate(self.rest) if v > lower]


def row_bands(row: list[float], chosen: list[int], alpha: float) -> RowBands:
    """``classify_host`` of one token without groups or bias (the same fp32 edges)."""
    rest = row.copy()
    for e in chosen:
        rest[e] = -INF
    best = max(rest)
    if best == -INF:
        return RowBands(row, rest, chosen, best, best, False)
    b = F32(best)
    margin = F32(alpha) * abs(b)
    return RowBands(row, rest, chosen, float(b + margin), float(b - margin), True)


def substitute_row(bands: RowBands, resident: list[bool]) -> tuple[list[int], list[bool]] | None:
    """Algorithm 1 for one token: the lowest missing non-top experts swapped for the best
    resident candidates; (new chosen, swapped flags), or None when nothing changes."""
    if not bands.finite:
        return None  # every expert chosen: all top-score, no candidate
    row, chosen, upper, lower = bands.row, bands.chosen, bands.upper, bands.lower
    missing = [j for j, e in enumerate(chosen) if not resident[e] and not row[e] > upper]
    if not missing:
        return None
    pool = [e for e, v in enumerate(bands.rest) if v > lower and resident[e]]
    n = min(len(missing), len(pool))
    if n == 0:
        return None
    replaced = sorted(missing, key=lambda j: row[chosen[j]])[:n]  # lowest first (stable)
    best = sorted(pool, key=row.__getitem__, reverse=True)[:n][::-1]  # n-th best first
    new, swapped = list(chosen), [False] * len(chosen)
    for j, e in zip(replaced, best, strict=True):
        new[j], swapped[j] = e, True
    return new, swapped


def mix_row(
    scores: np.ndarray,
    chosen: np.ndarray,
    weights: np.ndarray,
    swap: tuple[list[int], list[bool]],
    spec: RouterSpec,
    mode: WeightMode,
) -> np.ndarray | None:
    """``plan.mix_weights`` of one swapped token for the modes that change only the swapped
    slots (``own``, ``replaced``): the router's weights ``[k]`` with each substitute's own
    weight written in, in the same fp32 operations; None for ``own_renorm`` (use the numpy
    path). ``scores`` [E] and ``chosen`` [k] are the token's scores and the router's choice."""
    if mode == "replaced":
        return weights
    if mode != "own" and spec.norm_topk_prob:
        return None
    new, swapped = swap
    out = weights.copy()  # [k] fp32
    scale = F32(spec.scaling)
    if spec.norm_topk_prob:
        denominator = scores[chosen].sum(dtype=F32) + F32(1e-20)
        for j, e in enumerate(new):
            if swapped[j]:
                out[j] = scores[e] / denominator * scale
    else:
        for j, e in enumerate(new):
            if swapped[j]:
                out[j] = scores[e] * scale
    return out


def ranked_top(scores: np.ndarray, top_k: int, alpha: float) -> tuple[list[int], RowBands]:
    """The predicted top-score experts of one row ``[E]``, best first, and the row's bands.

    The model's top-k is the ``top_k`` highest scores, ties to the lower id (a stable sort,
    as the numpy path's stable argsort of the negated row); its top-score experts keep that
    order. One ``tolist`` and a sort of Python floats: no numpy call per element.
    """
    row = scores.tolist()
    chosen = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:top_k]
    bands = row_bands(row, chosen, alpha)
    if not bands.finite:
        return chosen, bands
    upper = bands.upper
    return [e for e in chosen if row[e] > upper], bands
