"""The host plan of one MoE layer: one small device-to-host copy, then plain numpy.

Per MoE layer and forward, the router wrapper copies the router's full scores, its top-k index
and its top-k weights to the host *once* (``HostRouting.read``: one packed fp32 ``[T, E + 2k]``
copy, the layer's only host sync). Everything that decides - substitution (Algorithm 1, here in
numpy: :func:`substitute_host`, checked against the tensor reference
``engine.offload.substitution.substitute``), eviction scores, prefetch accounting, the CPU-assist
split, and which token goes to which expert (``LayerPlan``) - runs on that copy. The device only
receives index tensors built here (``LayerPlan.device_indices``: one host-to-device copy).

Legend: T tokens, E experts, k experts per token, P = T*k (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from engine.offload.families import fp32
from engine.offload.substitution import ALPHA_MAX, WEIGHT_MODES, RouterSpec, WeightMode

F32 = np.float32


@dataclass(frozen=True)
class HostRouting:
    """One layer's routing on the host: scores [T, E], top-k index [T, k], weights [T, k]."""

    scores: np.ndarray  # [T, E] fp32
    idx: np.ndarray  # [T, k] int64
    weights: np.ndarray  # [T, k] fp32 (the router's weights, exactly, widened)
    extra: np.ndarray | None = None  # [T, X] fp32 riding along (the next layer's prediction)

    @classmethod
    def read(
        cls,
        scores: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> HostRouting:
        """The one device-to-host copy of a layer (E < 2**24, so ids are exact in fp32).

        ``extra`` ([T, X], e.g. the next layer's predicted scores) travels in the same copy.
        """
        e, k = scores.shape[1], idx.shape[1]
        parts = [fp32(scores), idx.float(), fp32(weights)]
        if extra is not None:
            parts.append(fp32(extra.reshape(scores.shape[0], -1)))
        packed = torch.cat(parts, dim=1)  # [T, E+2k(+X)]
        if packed.device.type != "cpu":
            packed = packed.cpu()
        host = packed.numpy()  # the layer's only host sync
        rest = host[:, e + 2 * k :] if extra is not None else None
        return cls(
            host[:, :e], host[:, e : e + k].astype(np.int64), host[:, e + k : e + 2 * k], rest
        )

    @property
    def tokens(self) -> int:
        return int(self.scores.shape[0])


# --------------------------------------------------------------------------- Algorithm 1


@dataclass(frozen=True)
class HostBands:
    top_score: np.ndarray  # [T, k] bool
    candidate: np.ndarray  # [T, E] bool
    choice: np.ndarray  # [T, E] fp32


def _allowed(choice: np.ndarray, spec: RouterSpec) -> np.ndarray | None:
    """[T, E] bool inside each token's chosen groups (group-limited routers); else None."""
    if spec.group_score is None:
        return None
    t, e = choice.shape
    grouped = choice.reshape(t, spec.n_group, e // spec.n_group)  # [T, G, E/G]
    if spec.group_score == "max":
        group = grouped.max(axis=-1)  # [T, G]
    else:
        group = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1, dtype=F32)  # [T, G]
    keep = np.argsort(-group, axis=-1, kind="stable")[:, : spec.topk_group]  # [T, topk_group]
    mask = np.zeros(group.shape, dtype=bool)
    mask[_rows(keep), keep] = True
    return np.repeat(mask, e // spec.n_group, axis=1)  # [T, E]


def classify_host(
    scores: np.ndarray, idx: np.ndarray, spec: RouterSpec, alpha: float, bias: np.ndarray | None
) -> HostBands:
    """``substitution.classify`` on host arrays (same rule, same fp32 arithmetic)."""
    choice = scores if bias is None else (scores + bias.astype(F32))  # [T, E]
    if spec.group_score is None and choice.shape[0] == 1:
        return _classify_row(choice, idx, alpha)
    if spec.group_score is None and choice.shape[0] <= SMALL_BATCH:
        return _classify_rows(choice, idx, alpha)
    allowed = _allowed(choice, spec)
    rows = _rows(idx)
    rest = choice.copy() if allowed is None else np.where(allowed, choice, F32(-np.inf))
    rest[rows, idx] = -np.inf  # [T, E] unselected (and allowed) only
    best = rest.max(axis=1, keepdims=True)  # [T, 1]
    finite = np.isfinite(best)
    margin = F32(alpha) * np.where(finite, np.abs(best), F32(0))  # [T, 1]
    upper = np.where(finite, best + margin, best)
    lower = np.where(finite, best - margin, best)
    top_score = choice[rows, idx] > upper  # [T, k]
    return HostBands(top_score=top_score, candidate=(rest > lower) & finite, choice=choice)


SMALL_BATCH = 4  # up to this many tokens, plain Python per row beats numpy's call overhead


def _classify_row(choice: np.ndarray, idx: np.ndarray, alpha: float) -> HostBands:
    """``classify_host`` of one token without groups: a handful of numpy calls on 1-D rows."""
    row, chosen = choice[0], idx[0]  # [E], [k]
    rest = row.copy()
    rest[chosen] = -np.inf  # unselected only
    best = rest.max()
    if best == -np.inf:  # every expert selected: all top-score, no candidate
        top, candidate = np.ones(chosen.shape, dtype=bool), np.zeros(row.shape, dtype=bool)
    else:
        margin = F32(alpha) * abs(best)
        top, candidate = row[chosen] > best + margin, rest > best - margin
    return HostBands(top_score=top[None, :], candidate=candidate[None, :], choice=choice)


def _classify_rows(choice: np.ndarray, idx: np.ndarray, alpha: float) -> HostBands:
    """``classify_host`` without groups, row by row in Python; the band edges in fp32."""
    a = F32(alpha)
    top_rows, candidate_rows = [], []
    for row, chosen in zip(choice.tolist(), idx.tolist(), strict=True):
        picked = set(chosen)
        rest = [-np.inf if e in picked else v for e, v in enumerate(row)]
        best = max(rest)
        if best == -np.inf:
            upper = lower = best
            candidate_rows.append([False] * len(row))
        else:
            b = F32(best)
            margin = a * abs(b)
            upper, lower = float(b + margin), float(b - margin)
            candidate_rows.append([v > lower for v in rest])
        top_rows.append([row[e] > upper for e in chosen])
    return HostBands(
        top_score=np.array(top_rows, dtype=bool).reshape(idx.shape),
        candidate=np.array(candidate_rows, dtype=bool).reshape(choice.shape),
        choice=choice,
    )


def _rows(idx: np.ndarray) -> np.ndarray:
    """[T, 1] row numbers to index ``[T, E]`` arrays with a ``[T, k]`` expert index."""
    return np.arange(idx.shape[0])[:, None]


@dataclass(frozen=True)
class HostSubstitution:
    """The final experts and weights after Algorithm 1, on the host."""

    idx: np.ndarray  # [T, k] int64
    weights: np.ndarray  # [T, k] fp32
    substituted: np.ndarray  # [T, k] bool

    @property
    def count(self) -> int:
        return int(self.substituted.sum())


def substitute_host(
    routing: HostRouting,
    resident: np.ndarray,
    spec: RouterSpec,
    alpha: float,
    *,
    bias: np.ndarray | None = None,
    weight_mode: WeightMode = "own",
    batch_set: bool = True,
    bands: HostBands | None = None,
) -> HostSubstitution | None:
    """Algorithm 1 on the host; ``None`` when nothing changes (alpha 0 or nothing to swap)."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}; got {weight_mode!r}")
    if not 0.0 <= alpha <= ALPHA_MAX:
        raise ValueError(f"alpha must be in [0, {ALPHA_MAX}]; got {alpha}")
    if alpha == 0.0:
        return None
    idx = routing.idx
    bands = bands or classify_host(routing.scores, idx, spec, alpha, bias)
    if routing.tokens <= SMALL_BATCH:
        swapped = _assign_rows(bands, idx, resident, batch_set)
        if swapped is None:
            return None
        new_idx, substituted = swapped
        return HostSubstitution(
            new_idx, mix_weights(routing, new_idx, substituted, spec, weight_mode), substituted
        )
    pool = resident.astype(bool).copy()  # [E]
    if batch_set and routing.tokens > 1:
        pool[idx[bands.top_score]] = True
    missing_low = ~bands.top_score & ~pool[idx]  # [T, k]
    candidate = bands.candidate & pool[None, :]  # [T, E]
    count = np.minimum(missing_low.sum(axis=1), candidate.sum(axis=1))  # [T]
    if not count.any():
        return None
    new_idx, substituted = _assign(bands.choice, idx, missing_low, candidate, count)
    weights = mix_weights(routing, new_idx, substituted, spec, weight_mode)
    return HostSubstitution(new_idx, weights, substituted)


def _assign_rows(
    bands: HostBands, idx: np.ndarray, resident: np.ndarray, batch_set: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Algorithm 1's availability and swaps row by row in Python (decode-sized batches)."""
    rows, top, candidate = idx.tolist(), bands.top_score.tolist(), bands.candidate.tolist()
    pool = [bool(x) for x in resident.tolist()]
    if batch_set and len(rows) > 1:  # the batch-wide top-score set C is available too
        for chosen, flags in zip(rows, top, strict=True):
            for e, is_top in zip(chosen, flags, strict=True):
                pool[e] = pool[e] or is_top
    choice = bands.choice.tolist()
    new_rows, swapped = [list(r) for r in rows], [[False] * len(r) for r in rows]
    changed = False
    for t, chosen in enumerate(rows):
        missing = [j for j, e in enumerate(chosen) if not top[t][j] and not pool[e]]
        pool_t = [e for e, ok in enumerate(candidate[t]) if ok and pool[e]]
        n = min(len(missing), len(pool_t))
        if n == 0:
            continue
        replaced = sorted(missing, key=lambda j: choice[t][chosen[j]])[:n]  # lowest first
        best = sorted(pool_t, key=lambda e: -choice[t][e])[:n][::-1]  # n-th best first
        for j, e in zip(replaced, best, strict=True):
            new_rows[t][j], swapped[t][j] = e, True
        changed = True
    if not changed:
        return None
    return np.array(new_rows, dtype=np.int64), np.array(swapped, dtype=bool)


def _assign(
    choice: np.ndarray,
    idx: np.ndarray,
    missing_low: np.ndarray,
    candidate: np.ndarray,
    count: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the ``count`` lowest missing experts replaced by the best candidates."""
    new_idx, substituted = idx.copy(), np.zeros(idx.shape, dtype=bool)
    for t in np.flatnonzero(count):
        n = int(count[t])
        slots = np.flatnonzero(missing_low[t])
        replaced = slots[np.argsort(choice[t, idx[t, slots]], kind="stable")][:n]  # lowest first
        pool = np.flatnonzero(candidate[t])
        best = pool[np.argsort(-choice[t, pool], kind="stable")][:n][::-1]  # n-th best first
        new_idx[t, replaced] = best
        substituted[t, replaced] = True
    return new_idx, substituted


def mix_weights(
    routing: HostRouting,
    idx: np.ndarray,
    substituted: np.ndarray,
    spec: RouterSpec,
    mode: WeightMode,
) -> np.ndarray:
    """``substitution._mix_weights`` on the host (fp32; cast to the router dtype on device)."""
    if mode == "replaced":
        return routing.weights
    if idx.shape[0] == 1:
        return _mix_row(routing, idx, substituted, spec, mode)
    scores = routing.scores
    affinity = scores[_rows(idx), idx]  # [T, k]
    renorm = mode == "own_renorm" and spec.norm_topk_prob
    if spec.norm_topk_prob:
        base = affinity if renorm else scores[_rows(idx), routing.idx]
        affinity = affinity / (base.sum(axis=1, keepdims=True, dtype=F32) + F32(1e-20))
    new = (affinity * F32(spec.scaling)).astype(F32)
    changed = substituted.any(axis=1, keepdims=True) if renorm else substituted
    return np.where(np.broadcast_to(changed, substituted.shape), new, routing.weights)


def _mix_row(
    routing: HostRouting,
    idx: np.ndarray,
    substituted: np.ndarray,
    spec: RouterSpec,
    mode: WeightMode,
) -> np.ndarray:
    """``mix_weights`` of one token on 1-D rows (the same fp32 operations, fewer numpy calls)."""
    row = routing.scores[0]  # [E]
    affinity = row[idx[0]]  # [k]
    renorm = mode == "own_renorm" and spec.norm_topk_prob
    if spec.norm_topk_prob:
        base = affinity if renorm else row[routing.idx[0]]
        affinity = affinity / (base.sum(dtype=F32) + F32(1e-20))
    new = (affinity * F32(spec.scaling)).astype(F32)
    changed = substituted[0]
    if renorm:
        changed = np.full(changed.shape, changed.any())
    return np.where(changed, new, routing.weights[0])[None, :]


def top_score_set(bands: HostBands, idx: np.ndarray) -> set[int]:
    """Experts that are top-score for at least one token."""
    return set(idx[bands.top_score].tolist())


def model_top_k_host(choice: np.ndarray, spec: RouterSpec) -> np.ndarray:
    """The experts the model would choose from these (biased) choice scores: [T, k]."""
    allowed = _allowed(choice, spec)
    masked = choice if allowed is None else np.where(allowed, choice, F32(-np.inf))
    return np.argsort(-masked, axis=1, kind="stable")[:, : spec.top_k]


def top_score_ranked(bands: HostBands, idx: np.ndarray) -> list[int]:
    """Top-score experts, best (highest choice score) first."""
    top = bands.top_score
    experts, values = idx[top], bands.choice[_rows(idx), idx][top]
    best: dict[int, float] = {}
    for e, value in zip(experts.tolist(), values.tolist(), strict=True):
        best[e] = max(best.get(e, -np.inf), value)
    return sorted(best, key=lambda e: -best[e])


# --------------------------------------------------------------------------- layer plan


@dataclass(frozen=True)
class LayerPlan:
    """Which token goes to which expert, decided on the host from the final top-k index."""

    idx: np.ndarray  # [T, k] int64 final experts (E = a padded, skipped slot)
    num_experts: int

    @cached_property
    def experts(self) -> list[int]:
        """The routed experts, ascending (the eager visiting order)."""
        return sorted(e for e in set(self.idx.ravel().tolist()) if e < self.num_experts)

    @cached_property
    def single_token(self) -> dict[int, int] | None:
        """For one token routed to distinct experts: expert -> its position in k; else None."""
        if self.idx.shape[0] != 1:
            return None
        row = self.idx[0].tolist()
        positions = {e: j for j, e in enumerate(row) if e < self.num_experts}
        return positions if len(positions) == len(row) else None

    def eager_pairs(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in k, tokens) of ``expert`` in the eager ``torch.where(mask[e])`` order."""
        pos, tok = np.nonzero(np.equal(self.idx.T, expert))  # (k, token) order
        return pos.astype(np.int64), tok.astype(np.int64)

    def eager_indices(self) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """All experts' (tokens, positions) packed into one int64 array, and the spans.

        The array is ``[tok_e0, pos_e0, tok_e1, pos_e1, ...]``; each span is ``(expert, start,
        length)`` with the tokens at ``[start, start+length)`` and positions right after.
        """
        t = self.idx.shape[0]
        flat = self.idx.T.ravel()  # [k*T] in (k, token) order, the order of torch.where
        order = np.argsort(flat, kind="stable")  # grouped by expert, (k, token) order kept
        counts = np.bincount(flat, minlength=self.num_experts + 1)
        parts: list[np.ndarray] = []
        spans: list[tuple[int, int, int]] = []
        start, first = 0, 0
        for expert in range(len(counts)):
            n = int(counts[expert])
            if n and expert < self.num_experts:
                chosen = order[first : first + n]
                parts += [chosen % t, chosen // t]
                spans.append((expert, start, n))
                start += 2 * n
            first += n
        packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return packed.astype(np.int64), spans

    def grouped_indices(self, slot_of: dict[int, int], num_slots: int) -> GroupedIndices:
        """Pairs sorted by slot (stable), for one grouped matmul over the slot pool."""
        flat = self.idx.reshape(-1)  # [P]
        pairs = np.flatnonzero(np.isin(flat, list(slot_of)))  # pairs computed from slots
        slots = np.array([slot_of[int(e)] for e in flat[pairs]], dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        sorted_pairs = pairs[order]  # [p] pair ids grouped by slot
        counts = np.bincount(slots, minlength=num_slots)
        offsets = np.cumsum(counts).astype(np.int64)  # [S]
        k = self.idx.shape[1]
        return GroupedIndices(sorted_pairs, sorted_pairs // k, offsets)

    def batched_indices(self, slot_of: dict[int, int]) -> BatchedIndices:
        """The pairs of the experts in ``slot_of``, in pair order, with their slots and tokens."""
        flat = self.idx.reshape(-1).tolist()  # [P]
        k = self.idx.shape[1]
        pairs = [p for p, e in enumerate(flat) if e in slot_of]
        slots = [slot_of[flat[p]] for p in pairs]
        return BatchedIndices(
            np.array(pairs, dtype=np.int64),
            np.array(slots, dtype=np.int64),
            np.array([p // k for p in pairs], dtype=np.int64),
            len(pairs) == len(flat),
        )


@dataclass(frozen=True)
class BatchedIndices:
    """Host indices of batched calls: pair ids (in order), their slots, and their tokens."""

    pairs: np.ndarray  # [p] int64, ascending
    slots: np.ndarray  # [p] int64
    tokens: np.ndarray  # [p] int64
    all_pairs: bool  # every pair of the layer, in order (no scatter needed)


@dataclass(frozen=True)
class GroupedIndices:
    """Host indices of one grouped call: pair ids, their tokens, and per-slot end offsets."""

    pairs: np.ndarray  # [p] int64, grouped by slot
    tokens: np.ndarray  # [p] int64
    offsets: np.ndarray  # [S] int64, cumulative rows per slot

    def packed(self) -> np.ndarray:
        return np.concatenate([self.pairs, self.tokens, self.offsets])


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of a host index array (pinned staging and async on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
