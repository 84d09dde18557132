"""The offload mechanism: routed experts in host memory, a device slot cache, wrapped routers.

Read top-down: ``routing`` (full router scores, rewrite hook) -> ``plan`` (the layer's one
host copy of its routing and every decision made on it) -> ``experts`` (runs the chosen experts
from the cache: eager-exact, or grouped) -> ``cache`` (global slot pool, copies, protection,
prefill streaming) -> ``eviction`` (policies) -> ``store`` (lazy safetensors reads) and
``stats`` (counters). ``families`` holds per-architecture router facts.

``OffloadController`` ties them together for one loaded model and is what the runtime sees.
Policies (substitution, prefetch, CPU assist, score eviction) plug in through
``RoutingWrapper.rewrite``, ``RoutingWrapper.listeners``, ``resident_mask`` and
``EvictionPolicy`` without changing this mechanism.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.config import LiveOptions
from engine.events import StatsSnapshot
from engine.offload.cache import ExpertCache
from engine.offload.eviction import EvictionPolicy, make_policy
from engine.offload.experts import ExpertsPath, OffloadedExperts
from engine.offload.plan import HostRouting, LayerPlan
from engine.offload.routing import RoutingWrapper
from engine.offload.stats import OffloadStats
from engine.offload.store import HostExpertStore

__all__ = ["OffloadController"]


class OffloadController:
    """One loaded model's offload state: store, cache, wrapped routers, counters."""

    def __init__(
        self,
        model: nn.Module,
        store: HostExpertStore,
        cache: ExpertCache,
        stats: OffloadStats,
        routers: Mapping[int, RoutingWrapper],
        experts: Mapping[int, OffloadedExperts],
        live: LiveOptions,
    ) -> None:
        self.store = store
        self.cache = cache
        self._stats = stats
        self.routers = dict(routers)
        self.experts = dict(experts)
        self.live = live
        self.last_scores: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._pending: tuple[LiveOptions, EvictionPolicy | None] | None = None
        self.method: Any = None  # the SMoE policies (engine.offload.method), set by the loader
        for layer, module in self.experts.items():
            module.bind(layer, cache)
        for wrapper in self.routers.values():
            wrapper.listeners.append(self._on_scores)
            wrapper.planner = self._plan
        self._hook = model.register_forward_pre_hook(self._on_forward)

    @property
    def step(self) -> int:
        return self.cache.step

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.experts)

    def stats(self) -> StatsSnapshot:
        """Thread-safe copy of the counters, with the device allocator and pinned host figures."""
        return dataclasses.replace(
            self._stats.snapshot(),
            device_allocated_bytes=self._device_allocated_bytes(),
            pinned_host_bytes=self.store.nbytes if self.store.pinned else None,
        )

    def _device_allocated_bytes(self) -> int | None:
        """What the torch CUDA allocator holds now; ``None`` when computing on the CPU."""
        device = self.cache.device
        if device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(device))

    def reset_stats(self) -> None:
        self._stats.reset()

    def end_step(self, num_tokens: int) -> None:
        """Close one forward of ``num_tokens`` tokens (per-token accounting, policy clock)."""
        self._stats.end_step(num_tokens)
        self.cache.step += 1

    def set_live_options(self, live: LiveOptions) -> None:
        """Queue new live options; they take effect at the start of the next forward."""
        policy = None
        if live.effective_eviction != self.live.effective_eviction or (
            live.score_window != self.live.score_window
        ):
            policy = make_policy(live.effective_eviction, live.score_window)  # raises if unknown
        with self._lock:
            self._pending = (live, policy)

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool: which experts of ``layer`` are in a device slot now."""
        return self.cache.resident_mask(layer)

    def close(self) -> None:
        """Unhook, free the device slots and the host buffers."""
        self._hook.remove()
        if self.method is not None:
            self.method.close()
        for wrapper in self.routers.values():
            wrapper.remove()
        self.cache.close()
        self.store.close()

    def _on_forward(self, module: nn.Module, args: object) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        live, policy = pending
        if policy is not None:
            self.cache.set_policy(policy)
        self.live = live

    def set_experts_path(self, path: ExpertsPath) -> None:
        """Compute experts with the eager-exact loop, grouped matmuls, or batched matmuls."""
        for module in self.experts.values():
            module.path = path

    def _on_scores(self, layer: int, scores: torch.Tensor) -> None:
        self.last_scores[layer] = scores

    def _plan(
        self, layer: int, scores: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's one host copy; the method decides on it; the experts get the plan."""
        extra = self.method.prediction(layer) if self.method is not None else None
        host = HostRouting.read(scores, idx, weights, extra)
        if self.method is not None:
            host, idx, weights = self.method.on_routing(layer, host, idx, weights)
        policy = self.cache.policy
        if not self.cache.holds_all and getattr(policy, "uses_scores", True):  # else no victims
            policy.record_scores(layer, _token_mean(host.scores), self.cache.step)
        module = self.experts.get(layer)
        if module is not None:
            module.plan = LayerPlan(host.idx, module.num_experts)
        return idx, weights


def _token_mean(scores: np.ndarray) -> np.ndarray:
    """[T, E] -> [E] mean over tokens (a decode step's single row as it is)."""
    if scores.shape[0] == 1:
        return scores[0]
    return scores.sum(axis=0, dtype=np.float32) / np.float32(scores.shape[0])
