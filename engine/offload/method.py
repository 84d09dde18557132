"""The SMoE method wired into the offload mechanism: substitution, prefetch and CPU assist.

``SmoeMethod`` attaches to an ``OffloadController`` through the mechanism's own hooks and reads
the controller's live options at every call, so alpha and the switches change between two
tokens without reloading:

- **substitution**: the router wrapper's ``rewrite`` hook runs Algorithm 1
  (``substitution.substitute``) on the family's full scores and the cache's residency. A
  substitute that no original choice needed is counted as a substitution, not as a hit.
- **prefetch**: a forward hook on each decoder layer predicts the next MoE layer's scores from
  this layer's output (through the next layer's post-attention norm and router, attention
  skipped, as the released code does) and copies its predicted top-score experts that are not
  resident (``cache.load``: a plain copy on CPU, the cache's copy stream on CUDA). Precision,
  recall and used copies are counted when the next layer routes.
- **CPU assist**: the experts module's ``source`` hook splits the layer's missing experts
  between copying and computing from the host copy (Algorithm 2, ``cpu_assist.plan``) with
  rolling measured costs; CPU-computed experts are not inserted into the cache. Experts are
  still visited in ascending id, so on a CPU device the sums are the eager ones bit for bit.

All three act only on decode-sized forwards (at most ``MAX_DECODE_TOKENS`` tokens); a prompt's
prefill runs the model unchanged (the released code substitutes at decode only). With alpha 0
the rewrite returns the router's own tensors, so the model output is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.offload.cache import ExpertWeights
from engine.offload.cpu_assist import RollingCost, plan
from engine.offload.families import SIGMOID_GROUPED, SOFTMAX_ALL, SOFTMAX_TOPK, RouterFamily
from engine.offload.prefetch import (
    PrefetchAccount,
    plan_prefetch,
    predict_scores,
    top_score_experts,
)
from engine.offload.substitution import DEFAULT_WEIGHT_MODE, RouterSpec, WeightMode, substitute

if TYPE_CHECKING:
    from engine.offload import OffloadController

MAX_DECODE_TOKENS = 3  # forwards with more tokens are prefill: no policy acts on them
PRIOR_COPY_BANDWIDTH = 10e9  # bytes/s until copies are measured
PRIOR_CPU_BANDWIDTH = 20e9  # bytes/s of a CPU expert GEMV until measured


def spec_for_family(family: RouterFamily, num_experts: int, top_k: int) -> RouterSpec | None:
    """The substitution/prefetch description of a router family; None where undefined."""
    kinds = {SOFTMAX_ALL: "softmax", SOFTMAX_TOPK: "softmax", SIGMOID_GROUPED: "sigmoid"}
    kind = kinds.get(family.name)
    if kind is None:
        return None
    grouped = family.group_limited
    return RouterSpec(
        family=family.model_type,
        kind=kind,  # type: ignore[arg-type]
        num_experts=num_experts,
        top_k=top_k,
        norm_topk_prob=family.renormalize,
        scaling=family.routed_scaling_factor,
        group_score=family.group_score if grouped else None,  # type: ignore[arg-type]
        n_group=int(family.n_group or 1) if grouped else 1,
        topk_group=int(family.topk_group or 1) if grouped else 1,
    )


@dataclass
class _PrefetchState:
    """What the prefetcher did for one layer, kept until that layer routes."""

    issued: set[int]
    predicted_top: set[int]
    resident_before: set[int]


class SmoeMethod:
    """Substitution, top-score prefetch and CPU assist for one loaded model."""

    def __init__(
        self,
        controller: OffloadController,
        model: nn.Module,
        family: RouterFamily,
        top_k: int,
        weight_mode: WeightMode = DEFAULT_WEIGHT_MODE,
        prefetch_limit: int | None = None,
    ) -> None:
        self.controller = controller
        self.cache = controller.cache
        self.spec = spec_for_family(family, controller.store.num_experts, top_k)
        self.weight_mode: WeightMode = weight_mode
        self.prefetch_limit = prefetch_limit
        self.prefetch_account = PrefetchAccount()
        expert_bytes = self.cache.shape.nbytes
        self.cost_load = RollingCost(prior=expert_bytes / PRIOR_COPY_BANDWIDTH)
        self.cost_cpu = RollingCost(prior=expert_bytes / PRIOR_CPU_BANDWIDTH)
        self._importance: dict[int, torch.Tensor] = {}  # layer -> [E] max score this step
        self._tokens: dict[int, int] = {}  # layer -> tokens in this forward
        self._prefetched: dict[int, _PrefetchState] = {}
        self._hooks: list[Any] = []
        self._attach(model)

    # ----------------------------------------------------------------- wiring

    def _attach(self, model: nn.Module) -> None:
        for wrapper in self.controller.routers.values():
            wrapper.rewrite = self._rewrite
        for module in self.controller.experts.values():
            module.source = self._source
        decoder = _decoder_layers(model)
        layers = self.controller.moe_layers
        if decoder is None or self.spec is None:
            return
        for following in layers[1:]:
            hook = decoder[following - 1].register_forward_hook(self._prefetch_hook(following))
            self._hooks.append(hook)
        self._norms = {i: getattr(decoder[i], "post_attention_layernorm", None) for i in layers}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def _live(self) -> Any:
        return self.controller.live

    # ----------------------------------------------------------------- substitution

    def _rewrite(
        self, layer: int, scores: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = scores.shape[0]
        self._tokens[layer] = tokens
        if tokens > MAX_DECODE_TOKENS:
            self._prefetched.pop(layer, None)
            return idx, weights
        self._importance[layer] = scores.max(dim=0).values  # [E]
        live = self._live
        if live.substitution_on and self.spec is not None:
            idx, weights = self._substitute(layer, scores, idx, weights, live.alpha)
        self._account_prefetch(layer, scores, idx)
        return idx, weights

    def _substitute(
        self, layer: int, scores: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.spec is not None
        resident = self.controller.resident_mask(layer)
        bias = self._router_bias(layer)
        out = substitute(
            scores, idx, w, resident, self.spec, alpha, bias=bias, weight_mode=self.weight_mode
        )
        final = set(out.idx.flatten().tolist())
        if out.idx is idx or len(final) > self.cache.num_slots:
            return idx, w  # streamed in chunks, a substitute could be evicted before its use
        added = final - set(idx.flatten().tolist())
        # substitutes are resident: the cache will count them as hits; they are substitutions
        self.cache.stats.add(layer, hits=-len(added), substitutions=len(added))
        return out.idx, out.weights

    def _router_bias(self, layer: int) -> torch.Tensor | None:
        router = self.controller.routers[layer].router
        bias = getattr(router, "e_score_correction_bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    # ----------------------------------------------------------------- prefetch

    def _prefetch_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor) or not self._live.prefetch_on:
                return
            flat = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            if flat.shape[0] <= MAX_DECODE_TOKENS:
                with torch.no_grad():
                    self._prefetch(layer, flat)

        return hook

    def _prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        assert self.spec is not None
        router = self.controller.routers[layer].router
        router_bias, weight = getattr(router, "bias", None), router.weight
        assert isinstance(weight, torch.Tensor), "a router keeps its weight as a tensor"
        predicted = predict_scores(
            hidden,
            weight,
            self.spec,
            norm=self._norms.get(layer),
            router_bias=router_bias if isinstance(router_bias, torch.Tensor) else None,
        )  # [T, E]
        resident = self.controller.resident_mask(layer)
        alpha, bias = self._live.alpha, self._router_bias(layer)
        issued = plan_prefetch(
            predicted, resident, self.spec, alpha, bias=bias, limit=self.prefetch_limit
        )
        top = _top_score(predicted, self.spec, alpha, bias)
        self.cache.prefetch([(layer, expert) for expert in issued])
        if issued:
            self.cache.stats.add(layer, prefetched=len(issued))
        before = set(torch.nonzero(resident).flatten().tolist())
        self._prefetched[layer] = _PrefetchState(set(issued), top, before)

    def _account_prefetch(self, layer: int, scores: torch.Tensor, idx: torch.Tensor) -> None:
        state = self._prefetched.pop(layer, None)
        if state is None or self.spec is None:
            return
        actual = _top_score(scores, self.spec, self._live.alpha, self._router_bias(layer))
        final = set(idx.flatten().tolist())
        used = state.issued & final
        needed = actual - state.resident_before
        self.cache.stats.add(layer, prefetch_used=len(used))
        self.cache.stats.add_prefetch_accuracy(
            len(state.predicted_top), len(needed), len(state.issued & needed)
        )
        self.prefetch_account.observe(state.predicted_top, actual, state.issued, final)

    # ----------------------------------------------------------------- CPU assist

    def _source(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertWeights]]:
        """The layer's experts in ascending id: cached ones via the cache, the rest split."""
        cpu = self._cpu_experts(layer, experts)
        if not cpu:
            yield from self._timed_stream(layer, list(experts))
            return
        self.cache.stats.add(layer, misses=len(cpu), cpu_computed=len(cpu))
        pending = sorted(cpu)
        on_device = [e for e in experts if e not in cpu]
        for chunk in self._timed_stream(layer, on_device):
            for item in chunk:
                while pending and pending[0] < item[0]:
                    yield from self._on_cpu(layer, pending.pop(0))
                yield [item]
        for expert in pending:
            yield from self._on_cpu(layer, expert)

    def _cpu_experts(self, layer: int, experts: Sequence[int]) -> set[int]:
        live = self._live
        if not live.cpu_assist_on or self._tokens.get(layer, 0) > MAX_DECODE_TOKENS:
            return set()
        missing = [e for e in experts if not self.cache.is_resident((layer, e))]
        importance = self._importance.get(layer)
        if not missing or importance is None:
            return set()
        scores = importance[missing].tolist()
        split = plan(missing, scores, self.cost_load.mean, self.cost_cpu.mean)
        return set(split.cpu)

    def _on_cpu(self, layer: int, expert: int) -> Iterator[list[ExpertWeights]]:
        """One expert computed from its host copy; the caller's compute is timed."""
        start = time.perf_counter()  # a quantized expert's first decode counts as CPU cost
        gate_up, down = self.controller.store.host_weights((layer, expert))
        yield [(expert, gate_up, down)]
        self.cost_cpu.add(time.perf_counter() - start)

    def _timed_stream(self, layer: int, experts: list[int]) -> Iterator[list[ExpertWeights]]:
        """``cache.stream`` with each chunk's copy time fed to the load cost (CPU devices)."""
        stream = self.cache.stream(layer, experts)
        ordered = sorted(experts)
        done = 0
        while True:
            chunk_keys = ordered[done : done + self.cache.num_slots]
            misses = sum(not self.cache.is_resident((layer, e)) for e in chunk_keys)
            start = time.perf_counter()
            chunk = next(stream, None)
            if chunk is None:
                return
            if misses and self.cache.device.type == "cpu":
                self.cost_load.add(time.perf_counter() - start, misses)
            done += len(chunk)
            yield chunk


def _top_score(
    scores: torch.Tensor, spec: RouterSpec, alpha: float, bias: torch.Tensor | None
) -> set[int]:
    from engine.offload.prefetch import model_top_k

    top_idx = model_top_k(scores, spec, bias)
    return set(top_score_experts(scores, top_idx, spec, alpha, bias).tolist())


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder layers (the longest ``*.layers`` module list)."""
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"
    ]
    return max(found, key=len) if found else None
