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

**Host plan.** The controller leaves each layer a ``LayerPlan`` (``engine.offload.plan``) made
from the one host copy of the routing, so the module never reads device values: which experts
run and each one's (token, position) lists come from the host, sent in one host-to-device copy.
Without a plan (a router the controller did not see) it reads the top-k index once itself.

**Grouped path** (``path = "grouped"``, the product's decode path on CUDA): the layer's
experts that sit in device slots run as two ``grouped_mm`` calls over the whole slot pool
(up and down, rows sorted by slot on the host, per-slot offsets), the arithmetic of transformers'
``experts_implementation="grouped_mm"`` (``integrations/moe.py``) op for op: the same row
products, ``proj * weights`` in the router's dtype, ``view(T, k, H).sum(1)``. It is exact
against that implementation, as the eager path is against the eager loop. On CUDA the
experts already resident run while the misses copy (a second grouped call after the demand
copy's event). The weights come from ``shape.expert_weights(slots)``: views of the whole pool
``(gate_up [S, 2I, H], down [S, H, I])`` for a full-precision shape; a quantized shape
dequantizes there. A layer with more experts than slots (prefill) runs in chunks of the pool,
ascending; rows do not depend on the grouping, so that is exact too.

**Batched path** (``path = "batched"``; ``--experts auto`` picks it on CUDA cards older than
compute capability 8.0, which have no ``grouped_mm`` kernels): each (token, expert) pair's
weights are gathered from its slot and the pairs run as two ``bmm`` calls, transformers'
``experts_implementation="batched_mm"`` op for op, and exact against it (rows and the weighted
sum are computed the same way; a lone pair of a larger layer is computed as a batch of two so
it takes the batched kernel). A decode step is ~17 ops per layer whatever k is, against ~8 per
expert for the eager loop; on a CPU the gather copies the chosen experts' weights once more,
so the eager loop stays the CPU default.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from engine.offload.cache import ExpertCache, ExpertWeights
from engine.offload.plan import LayerPlan, to_device

# Where a layer's device experts' weights come from: default ``cache.stream``; the SMoE method
# (``engine.offload.method``) times the copies for its CPU-assist cost model.
ExpertSource = Callable[[int, Sequence[int]], Iterable[list[ExpertWeights]]]
# Which of a layer's experts the CPU computes from their host copy (CPU assist); the rest
# are computed from device slots.
CpuSplit = Callable[[int, Sequence[int]], set[int]]
# Rows of some (token, expert) pairs from the slot pool: (pair ids, or None for every pair in
# order; rows [p, H]).
PairRows = Callable[[torch.Tensor, LayerPlan, list[int]], tuple[torch.Tensor | None, torch.Tensor]]
ExpertsPath = Literal["eager", "grouped", "batched"]
BATCHED_BYTES = 64 << 20  # gathered expert weights per batched call, at most


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
        self.cpu_split: CpuSplit | None = None
        self.on_cpu_time: Callable[[float], None] | None = None  # CPU-assist cost samples
        self.path: ExpertsPath = "eager"
        self.plan: LayerPlan | None = None  # left by the controller for the next forward

    def bind(self, layer: int, cache: ExpertCache) -> None:
        """Attach to the device expert cache as MoE layer ``layer``."""
        self.layer = layer
        self.cache = cache

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("offloaded experts used before the engine bound them to a cache")
        plan = self._take_plan(top_k_index)
        if self.path == "batched":
            return self._pooled(hidden_states, plan, top_k_weights, self._batched_rows)
        if self.path == "grouped":
            return self._pooled(hidden_states, plan, top_k_weights, self._grouped_rows)
        return self._eager(hidden_states, plan, top_k_weights)

    def _take_plan(self, top_k_index: torch.Tensor) -> LayerPlan:
        plan, self.plan = self.plan, None
        if plan is None or plan.idx.shape != tuple(top_k_index.shape):
            host = top_k_index.cpu().numpy().astype(np.int64)  # no controller plan: one sync
            plan = LayerPlan(host, self.num_experts)
        return plan

    # ----------------------------------------------------------------- eager (reference)

    def _eager(
        self, hidden_states: torch.Tensor, plan: LayerPlan, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        assert self.cache is not None
        final = torch.zeros_like(hidden_states)  # [T, H]
        single = plan.single_token
        if single is not None:  # decode: one token, its row and weights are plain views
            per_k = top_k_weights.unbind(1)  # k x [1]: one op, not a slice per expert
            for expert, current in self._eager_rows(hidden_states, plan, {}):  # [1, H] each
                current = current * _to(per_k[single[expert]], current.device)
                final.add_(_to(current, final.device, final.dtype))
            return final
        packed, spans = plan.eager_indices()
        indices = to_device(packed, hidden_states.device)  # one host-to-device copy
        views = {e: (indices[s : s + n], indices[s + n : s + 2 * n]) for e, s, n in spans}
        for expert, current in self._eager_rows(hidden_states, plan, views):  # [n, H] each
            token_idx, top_k_pos = views[expert]
            current = current * top_k_weights[token_idx, top_k_pos, None].to(current.device)
            final.index_add_(0, token_idx, current.to(final.device, final.dtype))
        return final

    def _eager_rows(
        self,
        hidden: torch.Tensor,
        plan: LayerPlan,
        views: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Each routed expert's rows, in ascending id (the eager accumulation order).

        Experts in device slots are computed here as the cache streams them; CPU-assisted ones
        (``cpu_split``) were handed to the assist worker before the first copy, so they compute
        while the main thread copies and computes the rest, and join in their place in the
        order. ``views``: expert -> (token ids, positions) on the device; empty for one token.
        """
        assert self.cache is not None
        on_cpu = self.cpu_split(self.layer, plan.experts) if self.cpu_split is not None else set()
        assisted = dict(zip(sorted(on_cpu), self._start_cpu(hidden, plan, on_cpu), strict=True))
        source = self.cache.stream if self.source is None else self.source
        on_device = [e for e in plan.experts if e not in on_cpu]
        for chunk in source(self.layer, on_device):
            for expert, gate_up, down in chunk:
                if assisted:
                    yield from _joined(assisted, below=expert)
                current = hidden[views[expert][0]] if views else hidden  # [n, H]
                yield expert, self._expert(current, gate_up, down)
        if assisted:
            yield from _joined(assisted, below=None)

    def _expert(
        self, current: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
    ) -> torch.Tensor:
        """One expert on its rows, where its weights are (the host for CPU assist)."""
        current = _to(current, gate_up.device)  # [n, H]
        gate, up = nn.functional.linear(current, gate_up).chunk(2, dim=-1)  # [n, I] each
        return nn.functional.linear(self.act_fn(gate) * up, down)  # [n, H]

    # ----------------------------------------------------------------- pooled (grouped, batched)

    def _pooled(
        self,
        hidden_states: torch.Tensor,
        plan: LayerPlan,
        top_k_weights: torch.Tensor,
        rows: PairRows,
    ) -> torch.Tensor:
        """Rows per (token, expert) pair from the slot pool, then one weighted sum over k.

        ``rows(hidden, plan, experts)`` computes the pairs of ``experts`` (resident) and
        returns (pair ids or ``None`` for all pairs in order, rows ``[p, H]``). A decode step
        whose experts are all resident is one call and needs no scatter.
        """
        assert self.cache is not None
        cache, layer = self.cache, self.layer
        t, k = plan.idx.shape
        on_cpu = self.cpu_split(layer, plan.experts) if self.cpu_split is not None else set()
        on_device = [e for e in plan.experts if e not in on_cpu]
        assisted = self._start_cpu(hidden_states, plan, on_cpu)
        parts: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        for start in range(0, len(on_device), cache.num_slots):  # chunks: prefill streaming
            chunk = on_device[start : start + cache.num_slots]
            with cache.staged(layer, chunk) as (ready, arriving):
                for experts, event in ((ready, None), (arriving, cache.arrival)):
                    if experts:
                        cache.wait(event)
                        parts.append(rows(hidden_states, plan, experts))
        if len(parts) == 1 and parts[0][0] is None and not assisted:
            proj = parts[0][1]  # [P, H] every pair, in order
        else:
            proj = hidden_states.new_zeros(t * k, self.hidden_dim)  # [P, H] rows per pair
            for pairs, part in parts:
                assert pairs is not None, "only a call covering every pair returns no ids"
                proj.index_copy_(0, pairs, _cast(part, proj.dtype))
            self._finish_cpu(proj, assisted)
        weighted = proj * top_k_weights.reshape(-1, 1)  # [P, H], router dtype
        return _cast(weighted.view(t, k, -1).sum(dim=1), hidden_states.dtype)  # [T, H]

    # ----------------------------------------------------------------- grouped

    def _grouped_rows(
        self, hidden: torch.Tensor, plan: LayerPlan, experts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One grouped up and down matmul over the slot pool for ``experts`` (resident)."""
        assert self.cache is not None
        slot_of = {e: self.cache.slot_index((self.layer, e)) for e in experts}
        grouped = plan.grouped_indices(slot_of, self.cache.num_slots)
        p = len(grouped.pairs)
        indices = to_device(grouped.packed(), hidden.device)  # one host-to-device copy
        pairs, tokens = indices[:p], indices[p : 2 * p]
        offsets = indices[2 * p :].to(torch.int32)  # [S]
        gate_up_t, down_t = self.cache.pool_weights_t()  # [S, H, 2I], [S, I, H]
        current = grouped_mm(hidden[tokens], gate_up_t, offsets)  # [p, 2I]
        gate, up = current.chunk(2, dim=-1)
        return pairs, grouped_mm(self.act_fn(gate) * up, down_t, offsets)  # [p, H]

    # ----------------------------------------------------------------- batched

    def _batched_rows(
        self, hidden: torch.Tensor, plan: LayerPlan, experts: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The pairs of ``experts`` (resident) as transformers' ``batched_mm`` computes them.

        Each pair's expert weights are gathered from its slot (``index_select`` on the pool,
        one op per projection; a row copy, several times faster on a CPU than
        ``pool[slots]``), then ``bmm(W, x.unsqueeze(-1))`` up, the gate, and down: a fixed
        number of ops whatever k is. Pairs go in slices whose gathered weights stay under
        ``BATCHED_BYTES`` (a long prompt would gather one copy of an expert per pair).
        """
        assert self.cache is not None
        slot_of = {e: self.cache.slot_index((self.layer, e)) for e in experts}
        batch = plan.batched_indices(slot_of)
        per_call = max(2, BATCHED_BYTES // self.cache.shape.nbytes)
        rows = [
            self._batched_slice(
                hidden,
                batch.slots[s : s + per_call],
                batch.tokens[s : s + per_call],
                plan.idx.size > 1,
            )
            for s in range(0, len(batch.pairs), per_call)
        ]
        out = rows[0] if len(rows) == 1 else torch.cat(rows)  # [p, H]
        if batch.all_pairs:
            return None, out
        return to_device(batch.pairs, hidden.device), out

    def _batched_slice(
        self, hidden: torch.Tensor, slots: np.ndarray, tokens: np.ndarray, pad: bool
    ) -> torch.Tensor:
        """``batched_mm_experts_forward``'s arithmetic for some pairs: rows ``[p, H]``."""
        assert self.cache is not None
        p = len(slots)
        indices = to_device(np.concatenate([slots, tokens]), hidden.device)  # one copy
        gate_up, down = self.cache.pool_weights()  # [S, 2I, H], [S, H, I]
        slots_t, tokens_t = indices[:p], indices[p:]
        current = hidden.index_select(0, tokens_t)  # [p, H] (transformers: repeat_interleave(k))
        current = _bmm(gate_up.index_select(0, slots_t), current, pad)  # [p, 2I]
        gate, up = current.chunk(2, dim=-1)
        return _bmm(down.index_select(0, slots_t), self.act_fn(gate) * up, pad)  # [p, H]

    def _start_cpu(
        self, hidden: torch.Tensor, plan: LayerPlan, experts: set[int]
    ) -> list[Future[tuple[np.ndarray, torch.Tensor]]]:
        """Hand the CPU-assisted experts to the assist worker before the device work starts.

        The worker computes while the main thread queues copies and grouped kernels (torch
        releases the GIL inside ops). On CUDA the hidden state reaches the host through a
        non-blocking copy whose event the *worker* waits for; the main thread never blocks.
        """
        assert self.cache is not None
        if not experts:
            return []
        host, ready = _to_host_async(hidden)
        pool = self.cache.assist_pool()
        return [pool.submit(self._cpu_expert, host, ready, plan, e) for e in sorted(experts)]

    def _cpu_expert(
        self, hidden: torch.Tensor, ready: Any, plan: LayerPlan, expert: int
    ) -> tuple[np.ndarray, torch.Tensor]:
        """(pair ids, rows [n, H]) of one expert from its host copy (on the assist worker)."""
        assert self.cache is not None
        if ready is not None:
            ready.synchronize()
        start = time.perf_counter()
        pos, tok = plan.eager_pairs(expert)
        rows = self._host_rows(hidden[torch.from_numpy(tok)], plan, expert)  # [n, H] host
        if self.on_cpu_time is not None:
            self.on_cpu_time(time.perf_counter() - start)
        return tok * plan.idx.shape[1] + pos, rows

    def _host_rows(self, current: torch.Tensor, plan: LayerPlan, expert: int) -> torch.Tensor:
        """One expert's rows from its host copy: torch's int4 kernel on its blocks where
        ``--cpu-assist-int4`` packed it (``engine.offload.packed``), else float weights."""
        assert self.cache is not None
        packed = self.cache.store.packed_expert((self.layer, expert))
        if packed is not None:
            return packed.rows(_cast(current, packed.dtype), self.act_fn)
        gate_up, down = self.cache.store.host_weights((self.layer, expert))
        if self.path == "batched":
            return _bmm_expert(current, gate_up, down, self.act_fn, plan.idx.size > 1)
        return self._expert(current, gate_up, down)

    def _finish_cpu(
        self, proj: torch.Tensor, futures: list[Future[tuple[np.ndarray, torch.Tensor]]]
    ) -> None:
        for future in futures:
            pairs, rows = future.result()
            proj.index_copy_(0, to_device(pairs, proj.device), _to(rows, proj.device, proj.dtype))


def _joined(
    assisted: dict[int, Future[tuple[np.ndarray, torch.Tensor]]], below: int | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Pop the assist worker's results for experts below ``below`` (all for None), ascending."""
    for expert in [e for e in assisted if below is None or e < below]:
        yield expert, assisted.pop(expert).result()[1]


def _bmm(weight: torch.Tensor, x: torch.Tensor, pad: bool) -> torch.Tensor:
    """``bmm(weight [p, out, in], x [p, in, 1])`` -> ``[p, out]``, as one row of a larger batch.

    A CPU ``bmm`` of one matrix takes the ``mm`` kernel, which rounds differently from the
    batched kernel that a call of two or more runs (whose rows do not depend on the batch).
    With ``pad`` (the reference computed more than one pair in one call) a single pair is
    computed as a batch of two views of itself, so a slice of the pairs rounds like the whole.
    """
    if pad and weight.shape[0] == 1:
        out = torch.bmm(weight.expand(2, -1, -1), x.unsqueeze(-1).expand(2, -1, -1))
        return out[:1].squeeze(-1)
    return torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)


def _bmm_expert(
    current: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn: nn.Module,
    pad: bool,
) -> torch.Tensor:
    """One expert's rows ``[n, H]`` with the batched path's arithmetic (a copy per row)."""
    n = current.shape[0]
    gate_up = gate_up.expand(n, *gate_up.shape).contiguous()  # [n, 2I, H]
    current = _bmm(gate_up, _to(current, gate_up.device), pad)  # [n, 2I]
    gate, up = current.chunk(2, dim=-1)  # [n, I] each
    down = down.expand(n, *down.shape).contiguous()  # [n, H, I]
    return _bmm(down, act_fn(gate) * up, pad)  # [n, H]


def _to_host_async(hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``hidden`` on the host: itself on a CPU device, else a pinned non-blocking copy + event."""
    if hidden.device.type == "cpu":
        return hidden, None
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    host.copy_(hidden, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(hidden.device))
    return host, ready


def _to(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without dispatching an op when nothing changes."""
    if tensor.device == device and (dtype is None or tensor.dtype == dtype):
        return tensor
    return tensor.to(device, dtype if dtype is not None else tensor.dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without dispatching an op when it is already that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [p, in] @ weight[g] [in, out]`` per group ``g`` of rows (``offsets``: group ends)."""
    if hasattr(nn.functional, "grouped_mm"):
        return nn.functional.grouped_mm(_cast(x, weight.dtype), weight, offs=offsets)
    return torch._grouped_mm(_cast(x, weight.dtype), weight, offs=offsets)


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
