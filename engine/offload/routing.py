"""The router wrapper: every token's full score vector in, final experts and weights out.

Each MoE block keeps its router as a separate module (``mlp.gate`` / ``mlp.router``) returning
``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``. The wrapper is a forward
hook on that module, so the router itself (its weights, dtype, grouping rules, the output
recorders transformers attaches to router classes) is untouched. After the router ran, the hook

1. computes the family's full pre-top-k scores ``[T, E]`` fp32 from the logits
   (``families.RouterFamily.scores``: for softmax routers the very op the router ranked on);
2. hands them to every listener ``listener(layer, scores)`` (the controller feeds the eviction
   policy with their per-step mean; tests capture them);
3. lets ``rewrite(layer, scores, top_idx, top_w) -> (idx, w)`` replace the choice on the
   device (a test hook); ``None`` is the identity, so the model runs unchanged;
4. hands the result to ``planner(layer, scores, top_idx, top_w) -> (idx, w)``, the offload
   controller: it copies the layer's routing to the host once and decides everything there
   (substitution included, ``engine.offload.plan``), returning the final choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.offload.families import RouterFamily

Rewrite = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
ScoreListener = Callable[[int, torch.Tensor], None]


class RoutingWrapper:
    """Observes and optionally rewrites one router's output (installed as a forward hook)."""

    def __init__(self, layer: int, router: nn.Module, family: RouterFamily) -> None:
        self.layer = layer
        self.router = router
        self.family = family
        self.rewrite: Rewrite | None = None
        self.planner: Rewrite | None = None
        self.listeners: list[ScoreListener] = []
        self._handle = router.register_forward_hook(self._on_output)

    def remove(self) -> None:
        self._handle.remove()

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not _is_routing_output(output):
            return None  # unknown output shape: pass through untouched
        logits, weights, indices = output
        scores = self.family.scores(logits)  # [T, E] fp32
        for listener in self.listeners:
            listener(self.layer, scores)
        new_indices, new_weights = indices, weights
        if self.rewrite is not None:
            new_indices, new_weights = self.rewrite(self.layer, scores, indices, weights)
        if self.planner is not None:
            new_indices, new_weights = self.planner(self.layer, scores, new_indices, new_weights)
        if new_indices is indices and new_weights is weights:
            return None
        return (logits, new_weights, new_indices)


def _is_routing_output(output: Any) -> bool:
    return (
        isinstance(output, tuple)
        and len(output) == 3
        and all(isinstance(t, torch.Tensor) for t in output)
        and output[2].dtype in (torch.int64, torch.int32)
    )
