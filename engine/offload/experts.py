"""The module that stands in for each ``@use_experts_implementation`` experts module.

It holds no parameters: its weights come from the device expert cache. ``forward`` has the
signature and the arithmetic of transformers' eager experts loop, op for op, so outputs are
bit-identical to ``experts_implementation="eager"`` whatever the cache holds:

- the same routing mask (``one_hot(top_k_index, E + 1).permute(2, 1, 0)``) and hit list;
- experts visited in ascending id, each with all its tokens at once, gathered in the eager
  (k, token) order of ``torch.where(mask[e])``;
- ``linear -> chunk -> act(gate) * up -> linear``, then multiplication by the router's weights in
  the router's own dtype (fp32 for Mixtral), cast back, ``index_add_`` into a zeroed output.

Weights are views into the cache's slots with the fused per-expert layout and alignment of
``gate_up_proj[e]`` / ``down_proj[e]``. Streaming a layer through the cache in chunks (prefill
with more experts than slots) keeps ascending order, so it changes nothing in the sums.

Only classes whose eager ``forward`` is the standard loop are replaced (``is_standard_eager``
compares the source); any other experts implementation is reported unsupported by the loader.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from engine.offload.cache import ExpertCache, ExpertWeights

# Where a layer's expert weights come from: default ``cache.stream``; the SMoE method's CPU
# assist (``engine.offload.method``) supplies host-resident weights for some experts.
ExpertSource = Callable[[int, Sequence[int]], Iterable[list[ExpertWeights]]]


class OffloadedExperts(nn.Module):
    """Parameter-less experts module computing the chosen experts from the cache."""

    _is_hf_initialized = True  # transformers' _init_weights must leave it alone

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden
        self.intermediate_dim = intermediate
        self.act_fn = act_fn
        self.layer = -1
        self.cache: ExpertCache | None = None
        self.source: ExpertSource | None = None

    def bind(self, layer: int, cache: ExpertCache) -> None:
        """Attach to the device expert cache as MoE layer ``layer``."""
        self.layer = layer
        self.cache = cache

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("offloaded experts used before the engine bound them to a cache")
        final = torch.zeros_like(hidden_states)  # [T, H]
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)  # [E + 1, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()  # [n, 1]
        experts = [e for e in hit.flatten().tolist() if e != self.num_experts]  # one host sync
        source = self.cache.stream if self.source is None else self.source
        for chunk in source(self.layer, experts):
            for expert, gate_up, down in chunk:
                self._accumulate(final, hidden_states, mask[expert], top_k_weights, gate_up, down)
        return final

    def _accumulate(
        self,
        final: torch.Tensor,
        hidden_states: torch.Tensor,
        expert_mask: torch.Tensor,
        top_k_weights: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> None:
        top_k_pos, token_idx = torch.where(expert_mask)  # [n], [n] in (k, token) order
        at = gate_up.device  # the host for a CPU-assisted expert; no-op moves otherwise
        current = hidden_states[token_idx].to(at)  # [n, H]
        gate, up = nn.functional.linear(current, gate_up).chunk(2, dim=-1)  # [n, I] each
        current = self.act_fn(gate) * up
        current = nn.functional.linear(current, down)  # [n, H]
        current = current * top_k_weights[token_idx, top_k_pos, None].to(at)  # router's dtype
        final.index_add_(0, token_idx, current.to(final.device, final.dtype))


def _normalised_body(source: str) -> str:
    body = source[source.index("final_hidden_states") :] if "final_hidden_states" in source else ""
    return re.sub(r"\s+", " ", body).strip()


def _eager_source(cls: Any) -> str:
    forward = getattr(cls.forward, "__wrapped__", cls.forward)
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return ""


@functools.cache
def _standard_body() -> str:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return _normalised_body(_eager_source(MixtralExperts))


def is_experts_class(cls: Any) -> bool:
    """A class decorated with ``@use_experts_implementation`` (whatever its attribute name)."""
    return (
        inspect.isclass(cls)
        and issubclass(cls, nn.Module)
        and hasattr(cls, "_apply_gate")
        and hasattr(cls.forward, "__wrapped__")
    )


def is_standard_eager(cls: type) -> bool:
    """Its eager forward is, token for token, the standard loop this module reproduces."""
    body = _normalised_body(_eager_source(cls))
    return bool(body) and body == _standard_body()


def offloaded_from(template: Any) -> OffloadedExperts:
    """An ``OffloadedExperts`` with the shapes and activation of a (meta) experts module."""
    num_experts, two_i, hidden = template.gate_up_proj.shape  # [E, 2I, H]
    return OffloadedExperts(int(num_experts), int(hidden), int(two_i) // 2, template.act_fn)


def placeholder_class(original: type) -> type:
    """A stand-in class built like ``original`` (same ``__init__`` arguments) but weightless."""

    def build(cls: type, config: Any, *args: Any, **kwargs: Any) -> OffloadedExperts:
        with torch.device("meta"):
            template = original(config, *args, **kwargs)
        return offloaded_from(template)

    return type(f"Offloaded{original.__name__}", (OffloadedExperts,), {"__new__": build})
