"""Importance bands and the expert-cache router (SMoE Algorithm 1), as a pure tensor policy.

Tables in, decisions out: a layer's pre-top-k router affinities, the model's own top-k choice,
and which experts are resident go in; the final experts and weights come out. Nothing here
moves weights or touches a cache; ``engine.offload.routing`` calls :func:`substitute` from its
router wrapper.

Rule (``docs/SMOE.md``), per token with ``S`` the best *unselected* (allowed) choice score:

- top-score: selected and ``c > S + alpha*|S|``; never substituted;
- low-score: the other selected experts;
- substitute candidates: unselected, allowed, ``c > S - alpha*|S|`` and available (resident,
  or - when more than one token is routed - a top-score expert of another token, set ``C``).

``|S|`` replaces the paper's ``S`` so that the band keeps its meaning for choice scores that can
be negative (DeepSeek-V3's biased sigmoid); for positive scores it is the paper's rule. A
low-score expert that is available stays; each other one is replaced by the highest-scoring
unused candidate. When candidates run short, the lowest-scoring missing experts are the ones
replaced (they matter least); replaced and substitutes are paired in score order.

Router families (``engine/ENGINE_NOTES.md``): the band is always drawn on the family's own
pre-top-k affinity. ``softmax`` covers Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 (greedy or
group-limited, ``routed_scaling_factor`` kept) and - exactly - GPT-OSS and Granite, whose
softmax over the k selected logits equals the softmax over all logits renormalised over the
selected ones. ``sigmoid`` is DeepSeek-V3: bands on ``sigmoid + e_score_correction_bias``,
weights from the unbiased sigmoid. PhiMoE's sparsemixer (sequential masked softmaxes with a
jitter threshold) has no score vector the band could be drawn on: it is refused.

Legend: T tokens, E experts, k experts per token, G expert groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.errors import SubstitutionUnsupportedError
from engine.offload.families import fp32

RouterKind = Literal["softmax", "sigmoid", "sparsemixer"]
GroupScore = Literal["max", "top2_sum"]
WeightMode = Literal["own", "own_renorm", "replaced"]

ROUTER_KINDS: tuple[str, ...] = ("softmax", "sigmoid", "sparsemixer")
GROUP_SCORES: tuple[str, ...] = ("max", "top2_sum")
WEIGHT_MODES: tuple[str, ...] = ("own", "own_renorm", "replaced")
ALPHA_MAX = 0.6
# Measured in docs/METHOD.md: lowest KL against the unmodified model at alpha 0.2-0.4.
DEFAULT_WEIGHT_MODE: WeightMode = "own"


@dataclass(frozen=True)
class RouterSpec:
    """What substitution needs to know about one model's router (shared by all its layers).

    ``group_score`` is None for routers without group limits; otherwise the model keeps, per
    token, the ``topk_group`` of ``n_group`` groups with the best group score ("max" of the
    group for DeepSeek-V2, "top2_sum" for DeepSeek-V3) and chooses only inside them.
    """

    family: str
    kind: RouterKind
    num_experts: int
    top_k: int
    norm_topk_prob: bool = False
    scaling: float = 1.0
    group_score: GroupScore | None = None
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}; got {self.kind!r}")
        if not 1 <= self.top_k < self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts); got {self.top_k} of {self.num_experts}"
            )
        if self.group_score is not None:
            self._check_groups()

    def _check_groups(self) -> None:
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}; got {self.group_score!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"{self.n_group} groups do not divide {self.num_experts} experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, {self.n_group}]; got {self.topk_group}")

    @property
    def substitutable(self) -> bool:
        return self.kind != "sparsemixer"


@dataclass(frozen=True)
class Bands:
    """Per-token classification of one layer's routing at one threshold."""

    top_score: torch.Tensor  # [T, k] bool: selected and above the upper band edge
    candidate: torch.Tensor  # [T, E] bool: unselected, allowed, inside the lower band
    choice: torch.Tensor  # [T, E] fp32: the score the bands are drawn on


@dataclass(frozen=True)
class Substitution:
    """The router's final decision for one layer."""

    idx: torch.Tensor  # [T, k] final experts (same dtype as the model's top-k index)
    weights: torch.Tensor  # [T, k] final mixing weights (same dtype as the model's)
    substituted: torch.Tensor  # [T, k] bool: slot now holds a substitute

    @property
    def count(self) -> int:
        return int(self.substituted.sum())


# --------------------------------------------------------------------------- families


def spec_from_config(config: Any) -> RouterSpec:
    """Build the router description from a transformers config, by ``model_type``."""
    model_type = str(getattr(config, "model_type", ""))
    builder = _SPEC_BUILDERS.get(model_type)
    if builder is None:
        raise SubstitutionUnsupportedError(
            f"Expert substitution does not know the router of model type {model_type!r}; "
            "use --no-substitution (or alpha 0) for this model."
        )
    return builder(config)


def _experts_of(config: Any) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"config of {config.model_type!r} names no number of experts")


def _softmax_spec(family: str, norm: bool) -> Callable[[Any], RouterSpec]:
    def build(config: Any) -> RouterSpec:
        return RouterSpec(
            family=family,
            kind="softmax",
            num_experts=_experts_of(config),
            top_k=int(config.num_experts_per_tok),
            norm_topk_prob=norm or bool(getattr(config, "norm_topk_prob", False)),
        )

    return build


def _deepseek_v2_spec(config: Any) -> RouterSpec:
    """DeepSeek-V2 in transformers never renormalises; it scales by routed_scaling_factor."""
    grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
    return RouterSpec(
        family="deepseek_v2",
        kind="softmax",
        num_experts=_experts_of(config),
        top_k=int(config.num_experts_per_tok),
        scaling=float(config.routed_scaling_factor),
        group_score="max" if grouped else None,
        n_group=int(config.n_group) if grouped else 1,
        topk_group=int(config.topk_group) if grouped else 1,
    )


def _deepseek_v3_spec(config: Any) -> RouterSpec:
    return RouterSpec(
        family="deepseek_v3",
        kind="sigmoid",
        num_experts=_experts_of(config),
        top_k=int(config.num_experts_per_tok),
        norm_topk_prob=bool(config.norm_topk_prob),
        scaling=float(config.routed_scaling_factor),
        group_score="top2_sum",
        n_group=int(config.n_group),
        topk_group=int(config.topk_group),
    )


def _phimoe_spec(config: Any) -> RouterSpec:
    return RouterSpec(
        family="phimoe",
        kind="sparsemixer",
        num_experts=_experts_of(config),
        top_k=int(config.num_experts_per_tok),
    )


_SPEC_BUILDERS = {
    "mixtral": _softmax_spec("mixtral", norm=True),
    "qwen2_moe": _softmax_spec("qwen2_moe", norm=False),
    "qwen3_moe": _softmax_spec("qwen3_moe", norm=False),
    "olmoe": _softmax_spec("olmoe", norm=False),
    "gpt_oss": _softmax_spec("gpt_oss", norm=True),
    "granitemoe": _softmax_spec("granitemoe", norm=True),
    "granitemoeshared": _softmax_spec("granitemoeshared", norm=True),
    "deepseek_v2": _deepseek_v2_spec,
    "deepseek_v3": _deepseek_v3_spec,
    "phimoe": _phimoe_spec,
}


def affinities(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The family's pre-top-k affinity from router logits: fp32 softmax or sigmoid, [T, E]."""
    if spec.kind == "sigmoid":
        return fp32(logits).sigmoid()
    if spec.kind == "softmax":
        return fp32(logits).softmax(dim=-1)
    raise _refusal(spec)


def _refusal(spec: RouterSpec) -> SubstitutionUnsupportedError:
    return SubstitutionUnsupportedError(
        f"Expert substitution is not defined for the {spec.family} router ({spec.kind}): it "
        "has no pre-top-k score vector to draw the importance band on. Run it with "
        "--no-substitution or alpha 0; caching, prefetch and CPU assist still work."
    )


# --------------------------------------------------------------------------- bands


def choice_scores(scores: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The score the model ranks experts by: the affinity, plus DeepSeek-V3's bias. [T, E]"""
    return scores if bias is None else scores + bias.to(scores.dtype)


def allowed_experts(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor | None:
    """[T, E] bool of the experts inside each token's chosen groups; None without groups.

    Recomputes the model's own group step with the same operations, so the mask matches it.
    """
    if spec.group_score is None:
        return None
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)  # [T, G, E/G]
    if spec.group_score == "max":
        group = grouped.max(dim=-1).values  # [T, G]
    else:
        group = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    keep = group.topk(spec.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    mask = torch.zeros_like(group, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
    return mask.unsqueeze(-1).expand(t, spec.n_group, e // spec.n_group).reshape(t, e)


def selected_mask(top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] bool with True at each token's selected experts."""
    mask = torch.zeros(top_idx.shape[0], num_experts, dtype=torch.bool, device=top_idx.device)
    return mask.scatter_(1, top_idx.long(), True)


def classify(
    scores: torch.Tensor,
    top_idx: torch.Tensor,
    spec: RouterSpec,
    alpha: float,
    bias: torch.Tensor | None = None,
) -> Bands:
    """Top-score selected experts and in-band unselected candidates (residency ignored)."""
    _check_inputs(scores, top_idx, spec, alpha)
    choice = choice_scores(scores.float(), bias)  # [T, E]
    allowed = allowed_experts(choice, spec)
    selected = selected_mask(top_idx, spec.num_experts)  # [T, E]
    outside = selected if allowed is None else selected | ~allowed
    rest = choice.masked_fill(outside, float("-inf"))  # [T, E]
    best_unselected = rest.max(dim=1, keepdim=True).values  # [T, 1] S_(k+1)
    finite = torch.isfinite(best_unselected)  # [T, 1]
    margin = alpha * best_unselected.abs().nan_to_num(0.0, posinf=0.0)  # [T, 1]
    upper = torch.where(finite, best_unselected + margin, best_unselected)  # [T, 1]
    lower = torch.where(finite, best_unselected - margin, best_unselected)  # [T, 1]
    top_score = choice.gather(1, top_idx.long()) > upper  # [T, k]
    candidate = (rest > lower) & finite  # [T, E]
    return Bands(top_score=top_score, candidate=candidate, choice=choice)


def _check_inputs(
    scores: torch.Tensor, top_idx: torch.Tensor, spec: RouterSpec, alpha: float
) -> None:
    if not spec.substitutable:
        raise _refusal(spec)
    if not 0.0 <= alpha <= ALPHA_MAX:
        raise ValueError(f"alpha must be in [0, {ALPHA_MAX}]; got {alpha}")
    if scores.dim() != 2 or scores.shape[1] != spec.num_experts:
        raise ValueError(f"scores must be [T, {spec.num_experts}]; got {tuple(scores.shape)}")
    if top_idx.dim() != 2 or top_idx.shape[0] != scores.shape[0]:
        raise ValueError(
            f"top-k index must be [T, k] with T = {scores.shape[0]}; got {tuple(top_idx.shape)}"
        )


# --------------------------------------------------------------------------- Algorithm 1


def substitute(
    scores: torch.Tensor,
    top_idx: torch.Tensor,
    top_w: torch.Tensor,
    resident: torch.Tensor,
    spec: RouterSpec,
    alpha: float,
    *,
    bias: torch.Tensor | None = None,
    weight_mode: WeightMode = DEFAULT_WEIGHT_MODE,
    batch_set: bool = True,
) -> Substitution:
    """Algorithm 1 for one layer: replace missing low-score experts by resident substitutes.

    ``scores`` [T, E] are the unbiased pre-top-k affinities (see :func:`affinities`), ``bias``
    DeepSeek-V3's per-layer ``e_score_correction_bias``, ``resident`` [E] bool. With
    ``alpha == 0`` (or nothing to substitute) the model's own tensors come back untouched.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}; got {weight_mode!r}")
    unchanged = Substitution(top_idx, top_w, torch.zeros_like(top_idx, dtype=torch.bool))
    if alpha == 0.0:
        _check_inputs(scores, top_idx, spec, alpha)
        return unchanged
    bands = classify(scores, top_idx, spec, alpha, bias)
    available = _available(resident, top_idx, bands, batch_set)  # [T, E]
    missing_low = ~bands.top_score & ~available.gather(1, top_idx.long())  # [T, k]
    candidate = bands.candidate & available  # [T, E]
    count = torch.minimum(missing_low.sum(dim=1), candidate.sum(dim=1))  # [T]
    if not bool(count.any()):
        return unchanged
    idx, substituted = _assign(bands.choice, top_idx, missing_low, candidate, count)
    weights = _mix_weights(scores.float(), top_idx, top_w, idx, substituted, spec, weight_mode)
    return Substitution(idx=idx, weights=weights, substituted=substituted)


def _available(
    resident: torch.Tensor, top_idx: torch.Tensor, bands: Bands, batch_set: bool
) -> torch.Tensor:
    """[T, E] bool: resident experts, plus the batch-wide top-score set C when T > 1."""
    t, e = bands.choice.shape
    if resident.shape != (e,):
        raise ValueError(f"resident mask must be [{e}]; got {tuple(resident.shape)}")
    pool = resident.to(device=top_idx.device, dtype=torch.bool)  # [E]
    if batch_set and t > 1:
        in_c = torch.zeros(e, dtype=torch.bool, device=top_idx.device)
        in_c[top_idx.long()[bands.top_score]] = True
        pool = pool | in_c
    return pool.unsqueeze(0).expand(t, e)


def _assign(
    choice: torch.Tensor,
    top_idx: torch.Tensor,
    missing_low: torch.Tensor,
    candidate: torch.Tensor,
    count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token's ``count`` lowest missing experts by its best candidates."""
    k = top_idx.shape[1]
    picked = choice.gather(1, top_idx.long())  # [T, k]
    order = picked.masked_fill(~missing_low, float("inf")).argsort(dim=1)  # [T, k] lowest first
    rank = torch.arange(k, device=top_idx.device).unsqueeze(0)  # [1, k]
    take = rank < count.unsqueeze(1)  # [T, k] by rank
    best = choice.masked_fill(~candidate, float("-inf"))  # [T, E]
    best_idx = best.topk(min(k, choice.shape[1]), dim=1).indices  # [T, k'] best first
    pair = (count.unsqueeze(1) - 1 - rank).clamp(0, best_idx.shape[1] - 1)  # [T, k]
    substitute_by_rank = best_idx.gather(1, pair).to(top_idx.dtype)  # [T, k]
    original_by_rank = top_idx.gather(1, order)  # [T, k]
    new_by_rank = torch.where(take, substitute_by_rank, original_by_rank)  # [T, k]
    idx = top_idx.clone().scatter_(1, order, new_by_rank)  # [T, k]
    substituted = torch.zeros_like(take).scatter_(1, order, take)  # [T, k]
    return idx, substituted


def _mix_weights(
    scores: torch.Tensor,
    top_idx: torch.Tensor,
    top_w: torch.Tensor,
    idx: torch.Tensor,
    substituted: torch.Tensor,
    spec: RouterSpec,
    mode: WeightMode,
) -> torch.Tensor:
    """Final mixing weights; only substituted slots change unless renormalising.

    ``own``: the substitute's weight is what the router gives it with the model's original
    denominator; ``own_renorm``: the model's rule applied to the final set (for routers that
    renormalise, every weight of a changed row is recomputed); ``replaced``: the substitute
    inherits the replaced expert's weight.
    """
    if mode == "replaced":
        return top_w
    affinity_new = scores.gather(1, idx.long())  # [T, k]
    renorm = mode == "own_renorm" and spec.norm_topk_prob
    if spec.norm_topk_prob:
        base = affinity_new if renorm else scores.gather(1, top_idx.long())  # [T, k]
        affinity_new = affinity_new / (base.sum(dim=1, keepdim=True) + 1e-20)
    weights_new = (affinity_new * spec.scaling).to(top_w.dtype)  # [T, k]
    changed = substituted.any(dim=1, keepdim=True).expand_as(substituted) if renorm else substituted
    return torch.where(changed, weights_new, top_w)
