"""Per-architecture facts the engine needs about a model's router.

A router family says what the router's "score" of an expert is (the pre-top-k affinity that
substitution bands and score eviction work on), how the model turns the chosen scores into mixing
weights, and which limits the choice obeys (expert groups). Facts come from reading each family's
router in transformers 5.23 (see ``docs/ENGINE_NOTES.md``):

- ``softmax_all``: scores ``softmax(logits.float())``. Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2.
- ``sigmoid_grouped``: scores ``sigmoid(logits.float())``; the choice adds
  ``e_score_correction_bias`` and is group-limited. DeepSeek-V3, GLM-4-MoE, dots1.
- ``softmax_topk``: scores ``softmax(logits.float())``; the model softmaxes only the k chosen
  logits. GPT-OSS, Granite.
- ``sparsemixer``: scores ``softmax(logits.float())``; the model uses a hard-wired top-2
  sparsemixer. PhiMoE.

For ``softmax_all`` the exposed scores are bit-identical to the probabilities the router itself
ranks (the same op on the same logits). For the other families they are the model's own
pre-top-k affinities (sigmoid) or a monotone transform of the logits it ranks (softmax_topk).
A model type not in the tables still runs offloaded (its router output is passed through), with
family ``unknown`` and substitution unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SOFTMAX_ALL = "softmax_all"
SIGMOID_GROUPED = "sigmoid_grouped"
SOFTMAX_TOPK = "softmax_topk"
SPARSEMIXER = "sparsemixer"
UNKNOWN = "unknown"

# model_type -> how top-k weights are renormalised: "always", "config" (norm_topk_prob), "never".
_SOFTMAX_ALL_TYPES: dict[str, str] = {
    "mixtral": "always",
    "minimax": "always",
    "qwen2_moe": "config",
    "qwen3_moe": "config",
    "qwen3_next": "config",
    "olmoe": "config",
    "flex_olmo": "config",
    "mellum": "config",
    "deepseek_v2": "never",
    "hunyuan_v1_moe": "always",
    "jamba": "never",
}
_SIGMOID_GROUPED_TYPES: dict[str, str] = {
    "deepseek_v3": "config",
    "deepseek_v32": "config",
    "glm4_moe": "config",
    "glm4_moe_lite": "config",
    "dots1": "config",
    "kimi_linear": "config",
    "exaone_moe": "config",
    "solar_open": "config",
}
_SOFTMAX_TOPK_TYPES = ("gpt_oss", "granitemoe", "granitemoeshared", "granitemoehybrid")
_SPARSEMIXER_TYPES = ("phimoe",)
_SUBSTITUTABLE = (SOFTMAX_ALL, SIGMOID_GROUPED)


@dataclass(frozen=True)
class RouterFamily:
    """How one model's router scores experts and turns chosen scores into weights."""

    name: str
    model_type: str
    renormalize: bool  # top-k weights divided by their sum
    routed_scaling_factor: float = 1.0
    n_group: int | None = None  # group-limited routing: number of expert groups
    topk_group: int | None = None  # groups a token may draw from
    group_score: str | None = None  # "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3)
    uses_score_bias: bool = False  # choice on score + e_score_correction_bias

    @property
    def substitution_supported(self) -> bool:
        return self.name in _SUBSTITUTABLE

    @property
    def group_limited(self) -> bool:
        return self.n_group is not None and self.topk_group is not None and self.n_group > 1

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The full pre-top-k score vector of every token: [T, E] fp32."""
        logits = router_logits
        if logits.dim() != 2:
            logits = logits.reshape(-1, router_logits.shape[-1])  # [T, E]
        if self.name == SIGMOID_GROUPED:
            return fp32(logits).sigmoid()
        return torch.nn.functional.softmax(fp32(logits), dim=-1)


def fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.float()`` without dispatching an op when it is fp32 already (the hot path)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _renormalize(mode: str, config: Any) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return bool(getattr(config, "norm_topk_prob", False))


def _deepseek_v2_groups(config: Any) -> tuple[int | None, int | None, str | None]:
    if getattr(config, "topk_method", "greedy") != "group_limited_greedy":
        return None, None, None
    return config.n_group, config.topk_group, "max"


def _softmax_all(model_type: str, config: Any) -> RouterFamily:
    mode = _SOFTMAX_ALL_TYPES[model_type]
    scale = 1.0
    groups: tuple[int | None, int | None, str | None] = (None, None, None)
    if model_type == "deepseek_v2":
        scale = float(getattr(config, "routed_scaling_factor", 1.0))
        groups = _deepseek_v2_groups(config)
    return RouterFamily(
        SOFTMAX_ALL, model_type, _renormalize(mode, config), scale, groups[0], groups[1], groups[2]
    )


def _sigmoid_grouped(model_type: str, config: Any) -> RouterFamily:
    n_group = getattr(config, "n_group", None)
    return RouterFamily(
        SIGMOID_GROUPED,
        model_type,
        _renormalize(_SIGMOID_GROUPED_TYPES[model_type], config),
        float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
        n_group,
        getattr(config, "topk_group", None),
        "top2_sum" if n_group else None,
        uses_score_bias=True,
    )


def router_family(config: Any) -> RouterFamily:
    """The router family of a (text) model config, ``unknown`` when not tabulated."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type in _SOFTMAX_ALL_TYPES:
        return _softmax_all(model_type, config)
    if model_type in _SIGMOID_GROUPED_TYPES:
        return _sigmoid_grouped(model_type, config)
    if model_type in _SOFTMAX_TOPK_TYPES:
        return RouterFamily(SOFTMAX_TOPK, model_type, renormalize=True)
    if model_type in _SPARSEMIXER_TYPES:
        return RouterFamily(SPARSEMIXER, model_type, renormalize=False)
    return RouterFamily(UNKNOWN, model_type, renormalize=False)


ROUTER_ATTRIBUTES = ("gate", "router")
"""Names under which an MoE block keeps its router, next to its ``experts`` module."""
