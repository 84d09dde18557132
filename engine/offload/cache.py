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
- **Copies**: on CUDA, misses are copied on a side stream (after the compute stream's queued
  work, since a victim slot may still be read by it) and the compute stream waits for them;
  on CPU the copy is a plain ``copy_``. Every copy is counted (count and bytes) per layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from engine.offload.eviction import EvictionPolicy, SlotKey
from engine.offload.stats import OffloadStats
from engine.offload.store import HostExpertStore

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
        self._resident = {  # per layer [E] bool, kept in step with _slot_of
            layer: torch.zeros(store.num_experts, dtype=torch.bool) for layer in store.layers
        }
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._inflight: dict[SlotKey, torch.cuda.Event] = {}  # prefetch copies not yet awaited

    @property
    def nbytes(self) -> int:
        return self._slots.numel() * self._slots.element_size()

    def resident(self) -> list[SlotKey]:
        return list(self._slot_of)

    def is_resident(self, key: SlotKey) -> bool:
        return key in self._slot_of

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[E] bool on the CPU: which experts of ``layer`` sit in a slot now."""
        return self._resident[layer].clone()

    def weights(self, key: SlotKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a resident expert's slot."""
        row = self._slots[self._slot_of[key]]
        shape = self.store.layer_shape(key[0])
        return shape.gate_up(row), shape.down(row)

    def stream(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertWeights]]:
        """Yield the layer's experts (ascending) in protected chunks that fit the pool."""
        ordered = sorted(experts)
        for start in range(0, len(ordered), self.num_slots):
            chunk = ordered[start : start + self.num_slots]
            with self.protect(layer, chunk):
                yield [(e, *self.weights((layer, e))) for e in chunk]

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

    def _ensure(self, keys: list[SlotKey]) -> None:
        misses = [key for key in keys if key not in self._slot_of]
        layer = keys[0][0] if keys else -1
        if keys:
            self.stats.add(layer, hits=len(keys) - len(misses), misses=len(misses))
        for key in keys:
            self.policy.record_use(key, self.step)
        if misses:
            self._copy_in(misses)
        self._await_prefetched(keys)

    def load(self, key: SlotKey) -> None:
        """Copy one expert in without counting a use (prefetch); no-op when resident."""
        if key not in self._slot_of:
            self._copy_in([key])

    def prefetch(self, keys: Sequence[SlotKey]) -> list[SlotKey]:
        """Start copying non-resident ``keys`` without counting a use; returns those copied.

        On CUDA the copies run on the copy stream and the compute stream waits for one only
        when a layer first uses it (``_ensure``), so they overlap the compute in between; on
        CPU they are plain synchronous copies.
        """
        new = [key for key in dict.fromkeys(keys) if key not in self._slot_of]
        if self._copy_stream is None or not new:
            if new:
                self._copy_in(new)
            return new
        slots = [self._claim_slot(key) for key in new]
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            for key, slot in zip(new, slots, strict=True):
                self._slots[slot].copy_(self.store.row(key), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        for key in new:
            self._inflight[key] = done
            self.stats.add(key[0], transfers=1, bytes_moved=self.shape.nbytes)
        return new

    def _await_prefetched(self, keys: list[SlotKey]) -> None:
        for key in keys:
            event = self._inflight.pop(key, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    def _copy_in(self, keys: list[SlotKey]) -> None:
        slots = [self._claim_slot(key) for key in keys]
        if self._copy_stream is None:
            for key, slot in zip(keys, slots, strict=True):
                self._slots[slot].copy_(self.store.row(key))
        else:
            self._copy_on_side_stream(keys, slots)
        for key in keys:
            self.stats.add(key[0], transfers=1, bytes_moved=self.shape.nbytes)

    def _copy_on_side_stream(self, keys: list[SlotKey], slots: list[int]) -> None:
        assert self._copy_stream is not None
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)  # victims may still be read by queued kernels
        with torch.cuda.stream(self._copy_stream):
            for key, slot in zip(keys, slots, strict=True):
                self._slots[slot].copy_(self.store.row(key), non_blocking=True)
        compute.wait_stream(self._copy_stream)

    def _claim_slot(self, key: SlotKey) -> int:
        slot = self._free_slot()
        if slot is None:
            victim = self.policy.victim(list(self._slot_of), self._protected)
            slot = self._slot_of.pop(victim)
            self._resident[victim[0]][victim[1]] = False
            self.policy.forget(victim)
            self._inflight.pop(victim, None)  # its copy is ordered before any overwrite
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self._resident[key[0]][key[1]] = True
        return slot

    def _free_slot(self) -> int | None:
        if len(self._slot_of) >= self.num_slots:
            return None
        return self._key_of.index(None) if None in self._key_of else None

    def clear(self) -> None:
        """Empty every slot (the memory stays allocated)."""
        for key in list(self._slot_of):
            self.policy.forget(key)
        self._slot_of.clear()
        for mask in self._resident.values():
            mask.zero_()
        self._inflight.clear()
        self._key_of = [None] * self.num_slots

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Switch eviction rule; the new policy learns the residents as just used."""
        self.policy = policy
        for key in self._slot_of:
            policy.record_use(key, self.step)

    def close(self) -> None:
        self.clear()
        self._slots = torch.empty(0, dtype=self.shape.dtype, device=self.device)
