"""The device expert cache: a fixed pool of slots, filled from the host store on demand.

Mechanism only (which expert leaves is the eviction policy's call):

- **One global pool** of ``num_slots`` slots shared by all MoE layers, as in the paper: a layer
  that routes to few experts leaves room for one that routes to many, and the budget is one
  number. Slots are allocated once (``[S, numel]`` on the device) and reused in place.
- **Protection**: the experts of the chunk being computed are protected from eviction until
  the chunk is released, so a layer can never evict what it is about to use.
- **Prefill streaming**: a layer may need more experts than there are slots (many tokens route
  to almost every expert). ``stream`` then walks the layer's experts in ascending id in chunks
  of at most ``num_slots`` experts, loading and computing one chunk before the next. Every
  chunk fits because only the current chunk is protected, so the smallest legal cache is one
  decode step's working set, ``min(E, top_k)`` slots, and nothing can deadlock. Ascending
  order and whole-expert chunks keep the eager accumulation order (see ``experts.py``).
- **Copies**: on CUDA, demand misses are copied on a high-priority stream and prefetches on
  a low-priority one, so a demand miss never queues behind a wrong prefetch; both start after
  the compute stream's queued work (a victim slot may still be read by it). ``staged`` lets
  the caller compute the layer's resident experts while its misses copy and wait for the copy
  event (``arrival``) only before computing them; on CPU the copy is a plain ``copy_``. Every
  copy is counted (count and bytes) per layer, and copy time on CUDA is measured with events
  (``copy_seconds_per_expert``) for the CPU-assist cost model.
- **Residency** is host state (numpy masks, a dict of slots), never read from the device;
  eviction asks the policy for a victim among the resident keys (a set view, O(1) to pass).
- **Close** waits for every copy in flight before the slots and host buffers go.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from engine.offload.copies import CopyEngine, copies_for
from engine.offload.eviction import EvictionPolicy, SlotKey
from engine.offload.stats import OffloadStats
from engine.offload.store import ExpertShape, HostExpertStore

ExpertWeights = tuple[int, torch.Tensor, torch.Tensor]  # (expert, gate_up [2I, H], down [H, I])


class ExpertCache:
    """``num_slots`` device slots holding experts copied from a ``HostExpertStore``."""

    def __init__(
        self,
        store: HostExpertStore,
        num_slots: int,
        device: torch.device,
        policy: EvictionPolicy,
        stats: OffloadStats,
        copies: CopyEngine | None = None,
    ) -> None:
        self.store = store
        self.shape = store.shape
        self.num_slots = num_slots
        self.device = device
        self.policy = policy
        self.stats = stats
        self.step = 0
        self._slots = torch.empty(
            num_slots, self.shape.numel, dtype=self.shape.dtype, device=device
        )
        self._slot_of: dict[SlotKey, int] = {}
        self._key_of: list[SlotKey | None] = [None] * num_slots
        self._protected: set[SlotKey] = set()
        self._layers = sorted(store.layers)
        self._residency = np.zeros((len(self._layers), store.num_experts), dtype=bool)  # [L, E]
        self._resident = {  # per layer [E] bool row views of _residency, kept with _slot_of
            layer: self._residency[row] for row, layer in enumerate(self._layers)
        }
        self.copies = copies if copies is not None else copies_for(device)
        self._inflight: dict[SlotKey, Any] = {}  # prefetch tickets not yet awaited
        self.arrival: list[Any] = []  # the copy tickets of the staged chunk's arriving experts
        self._after: list[Any] = []  # tickets of evicted in-flight prefetches: order after them
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pool_t: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending_demand: list[Any] = []
        self._free = list(range(num_slots - 1, -1, -1))  # free slots, lowest on top
        self._slot_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._assist: ThreadPoolExecutor | None = None
        # A pool with a slot for every expert never evicts: once all of a layer's experts sit
        # in slots, ``stream`` serves that layer without protection or policy records.
        self.holds_all = num_slots >= store.num_experts * len(self._layers)
        self._full: set[int] = set()  # layers wholly resident in a holds_all pool

    @property
    def nbytes(self) -> int:
        return self._slots.numel() * self._slots.element_size()

    def resident(self) -> list[SlotKey]:
        return list(self._slot_of)

    def is_resident(self, key: SlotKey) -> bool:
        return key in self._slot_of

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool on the CPU: which experts of ``layer`` sit in a slot now."""
        return torch.from_numpy(self._resident[layer].copy())

    def resident_host(self, layer: int) -> np.ndarray:
        """[E] bool numpy copy of the layer's residency (host state, no device read)."""
        return self._resident[layer].copy()

    def resident_list(self, layer: int) -> list[bool]:
        """[E] the layer's residency as Python bools (the decode planner's form)."""
        return self._resident[layer].tolist()  # type: ignore[no-any-return]

    def slot_index(self, key: SlotKey) -> int:
        return self._slot_of[key]

    def pool_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's weights: ``shape.expert_weights`` of the pool (gate_up [S, 2I, H],
        down [S, H, I]). Views of the slots are kept (made once); anything else (a quantized
        shape dequantizing) is rebuilt at every call, since the slots change under it."""
        if self._pool is not None:
            return self._pool
        assert isinstance(self.shape, ExpertShape), "grouped compute needs float slots"
        pool = self.shape.expert_weights(self._slots)
        if all(part._is_view() for part in pool):
            self._pool = pool
        return pool

    def pool_weights_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pool_weights`` transposed for ``x @ W``: ([S, H, 2I], [S, I, H]) views, made once."""
        if self._pool_t is not None:
            return self._pool_t
        gate_up, down = self.pool_weights()
        pool_t = (gate_up.transpose(-2, -1), down.transpose(-2, -1))
        if self._pool is not None:
            self._pool_t = pool_t
        return pool_t

    def weights(self, key: SlotKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a resident expert's slot."""
        slot = self._slot_of[key]
        views = self._slot_views.get(slot)  # float views of a slot fit whatever it holds
        if views is not None:
            return views
        row = self._slots[slot]
        shape = self.store.layer_shape(key[0])  # GGUF files may mix block types across layers
        views = shape.gate_up(row), shape.down(row)
        if isinstance(shape, ExpertShape):  # a quantized shape decodes a fresh copy: not kept
            self._slot_views[slot] = views
        return views

    def stream(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertWeights]]:
        """Yield the layer's experts (ascending) in protected chunks that fit the pool.

        In a pool that holds every expert, a layer whose experts are all resident is one
        chunk of hits: nothing can be evicted, so no protection, no policy record (the
        policy is only asked for victims, and there are none), no copy to wait for.
        """
        ordered = sorted(experts)
        if layer in self._full and not self._inflight:
            self.stats.add(layer, hits=len(ordered))
            yield [(e, *self.weights((layer, e))) for e in ordered]
            return
        for start in range(0, len(ordered), self.num_slots):
            chunk = ordered[start : start + self.num_slots]
            with self.protect(layer, chunk):
                yield [(e, *self.weights((layer, e))) for e in chunk]
        if self.holds_all and bool(self._resident[layer].all()):
            self._full.add(layer)

    @contextmanager
    def protect(self, layer: int, experts: Sequence[int]) -> Iterator[None]:
        """Make ``experts`` of ``layer`` resident and keep them there inside the block."""
        keys = [(layer, e) for e in experts]
        if len(keys) > self.num_slots:
            raise ValueError(f"{len(keys)} experts cannot be resident in {self.num_slots} slots")
        self._protected.update(keys)
        try:
            self._ensure(keys)
            yield
        finally:
            self._protected.difference_update(keys)

    @contextmanager
    def staged(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Protect ``experts`` and start their copies; yield (ready now, arriving).

        The arriving ones (demand misses, and prefetches still copying) may be computed only
        after ``wait(arrival)``. On a CPU device every copy is done before the yield.
        """
        keys = [(layer, e) for e in experts]
        if len(keys) > self.num_slots:
            raise ValueError(f"{len(keys)} experts cannot be resident in {self.num_slots} slots")
        self._protected.update(keys)
        try:
            copying = set(self._start(keys)) if keys else set()
            prefetched = [k for k in keys if k in self._inflight]
            self.arrival = [self._inflight.pop(k) for k in prefetched] + self._pending_demand
            arriving = (copying | set(prefetched)) if self.arrival else set()
            yield [e for e in experts if (layer, e) not in arriving], sorted(e for _, e in arriving)
        except BaseException:
            self._drop_failed(keys)
            raise
        finally:
            self._protected.difference_update(keys)
            self.arrival, self._pending_demand = [], []

    def wait(self, tickets: Sequence[Any] | None) -> None:
        """Order compute after these copies (no-op for ``None`` or no tickets)."""
        if tickets:
            self.copies.wait(tickets)

    def _drop_failed(self, keys: list[SlotKey]) -> None:
        """After a failed copy: forget these keys' slots (their contents are unknown)."""
        for key in keys:
            slot = self._slot_of.pop(key, None)
            if slot is None:
                continue
            self._resident[key[0]][key[1]] = False
            self._full.discard(key[0])
            self.policy.forget(key)
            self._inflight.pop(key, None)
            self._key_of[slot] = None
            self._slot_views.pop(slot, None)
            self._free.append(slot)

    def _start(self, keys: list[SlotKey]) -> list[SlotKey]:
        """Count the uses, start the demand copies; returns the keys being copied now."""
        misses = [key for key in keys if key not in self._slot_of]
        if keys:
            self.stats.add(keys[0][0], hits=len(keys) - len(misses), misses=len(misses))
        for key in keys:
            self.policy.record_use(key, self.step)
        self.store.read_ahead(misses)  # a mapped file: every miss's disk read starts now
        self._pending_demand = self._copy_in(misses, wait=False) if misses else []
        return misses

    def _ensure(self, keys: list[SlotKey]) -> None:
        try:
            self._start(keys)
            self.wait(self._pending_demand)
            self._await_prefetched(keys)
        except BaseException:
            self._drop_failed(keys)
            raise
        finally:
            self._pending_demand = []

    def load(self, key: SlotKey) -> None:
        """Copy one expert in without counting a use (prefetch); no-op when resident."""
        if key not in self._slot_of:
            self._copy_in([key])

    def prefetch(self, keys: Sequence[SlotKey]) -> list[SlotKey]:
        """Start copying non-resident ``keys`` without counting a use; returns those copied.

        The copies go to the copy engine's prefetch queue (CUDA: the low-priority stream) and
        compute waits for one only when a layer first uses it (``_ensure``/``staged``), so
        they overlap the compute in between; on a CPU device they are plain copies.
        """
        new = [key for key in dict.fromkeys(keys) if key not in self._slot_of]
        if not new:
            return new
        self.store.read_ahead(new)
        ticket = self._copy_in(new, demand=False)
        if ticket is not None:
            for key in new:
                self._inflight[key] = ticket
        return new

    def _await_prefetched(self, keys: list[SlotKey]) -> None:
        tickets = [self._inflight.pop(key) for key in keys if key in self._inflight]
        self.wait(tickets)

    def _copy_in(self, keys: list[SlotKey], wait: bool = True, demand: bool = True) -> Any:
        """Claim slots and copy ``keys`` in; the demand copy's tickets unless ``wait``."""
        slots = [self._claim_slot(key) for key in keys]
        sizes = [self.store.layer_shape(key[0]).numel for key in keys]  # the layer's own row
        for key in keys:
            self.stats.add(key[0], transfers=1, bytes_moved=self.store.source_bytes(key[0]))
        if self._after:  # a victim's prefetch may still be writing its slot
            self.copies.wait(self._after)
            self._after = []
        jobs = []
        for key, slot, size in zip(keys, slots, sizes, strict=True):
            target = self._slots[slot, :size]
            source = self.store.row_into(key, target)  # a decoding store writes the slot itself
            if source is not None:
                jobs.append((target, source[:size]))
        ticket = self.copies.copy(jobs, demand)
        if not demand:
            return ticket
        tickets = [] if ticket is None else [ticket]
        if wait:
            self.wait(tickets)
            return []
        return tickets

    @property
    def copy_seconds_per_expert(self) -> float | None:
        """Mean measured copy time of one expert (CUDA events); ``None`` before or on CPU."""
        return self.copies.seconds_per_expert

    def _claim_slot(self, key: SlotKey) -> int:
        slot = self._free_slot()
        if slot is None:
            victim = self._victim()
            slot = self._slot_of.pop(victim)
            self._resident[victim[0]][victim[1]] = False
            self._full.discard(victim[0])
            self.policy.forget(victim)
            pending = self._inflight.pop(victim, None)
            if pending is not None:  # its prefetch copy must land before the slot is rewritten
                self._after.append(pending)
        self._slot_of[key] = slot
        self.policy.record_load(key)
        self._key_of[slot] = key
        self._resident[key[0]][key[1]] = True
        return slot

    def _victim(self) -> SlotKey:
        """The policy's victim; policies that rank by layer tables get the residency masks."""
        masked = getattr(self.policy, "victim_in", None)
        if masked is not None:
            victim: SlotKey = masked(self._layers, self._residency, self._protected)
            return victim
        return self.policy.victim(self._slot_of.keys(), self._protected)

    def _free_slot(self) -> int | None:
        return self._free.pop() if self._free else None

    def clear(self) -> None:
        """Empty every slot (the memory stays allocated)."""
        self.synchronize()
        for key in list(self._slot_of):
            self.policy.forget(key)
        self._slot_of.clear()
        self._full.clear()
        for mask in self._resident.values():
            mask[:] = False
        self._inflight.clear()
        self._key_of = [None] * self.num_slots
        self._free = list(range(self.num_slots - 1, -1, -1))

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Switch eviction rule; the new policy learns the residents as just used."""
        self.policy = policy
        for key in self._slot_of:
            policy.record_use(key, self.step)

    def assist_pool(self) -> ThreadPoolExecutor:
        """The one worker thread that computes CPU-assisted experts next to the copies."""
        if self._assist is None:
            self._assist = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-assist")
        return self._assist

    def synchronize(self) -> None:
        """Wait for every copy in flight (before slots or host buffers are reused or freed)."""
        self.copies.synchronize()

    def close(self) -> None:
        """Wait for copies and CPU-assist work in flight, then free the slots."""
        if self._assist is not None:
            self._assist.shutdown(wait=True)
            self._assist = None
        self.clear()
        self._pool = self._pool_t = None
        self._slot_views.clear()
        self._slots = torch.empty(0, dtype=self.shape.dtype, device=self.device)
