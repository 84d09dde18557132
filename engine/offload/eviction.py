"""Which resident expert leaves the device cache: the policy interface, LRU and LFU.

Policies are pure bookkeeping: the cache tells them about uses (``record_use``) and, every
forward, about each layer's mean router scores (``record_scores``); when it needs a slot it asks
for a ``victim`` among the resident experts that are not protected (the experts of the layer
being computed). Policies never touch tensors on the device or move data.

LRU is the mixtral-offloading baseline (a use refreshes recency); an expert loaded without a use
(a prefetch) counts as the least recent. It keeps its keys in recency order, so a victim costs
O(1) amortised (it skips only protected keys) instead of a scan of every resident slot.
LFU counts uses since the expert was last loaded (``forget`` resets it), ties broken by recency;
its ranks sit in a heap with lazy deletion, so a victim costs O(log n) amortised.
The score-windowed policy of the paper lives in ``engine/offload/score_eviction.py``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Collection
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from engine.errors import InvalidRequestError

SlotKey = tuple[int, int]  # (layer index, expert index)


class EvictionPolicy(Protocol):
    """The interface every eviction rule implements."""

    def record_use(self, key: SlotKey, step: int) -> None: ...

    def record_load(self, key: SlotKey) -> None:
        """``key`` was copied in without a use (a prefetch)."""
        ...

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        """``scores``: [E] fp32 mean score of this layer's experts over this step's tokens
        (a host array; a CPU tensor is accepted too)."""
        ...

    def victim(self, resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> SlotKey: ...

    def forget(self, key: SlotKey) -> None: ...


class LRUPolicy:
    """Evict the expert used longest ago (keys kept oldest first)."""

    uses_scores = False  # the controller need not compute score means for it

    def __init__(self) -> None:
        self._order: OrderedDict[SlotKey, None] = OrderedDict()

    def record_use(self, key: SlotKey, step: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def record_load(self, key: SlotKey) -> None:
        if key not in self._order:
            self._order[key] = None
            self._order.move_to_end(key, last=False)  # never used: the least recent

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        return None

    def victim(self, resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> SlotKey:
        for key in self._order:
            if key not in protected and key in resident:
                return key
        unknown = sorted(k for k in resident if k not in self._order and k not in protected)
        if unknown:  # resident but never reported: the least recent of all
            return unknown[0]
        raise RuntimeError("every resident expert is protected; the cache is below its minimum")

    def forget(self, key: SlotKey) -> None:
        self._order.pop(key, None)


class LFUPolicy:
    """Evict the expert used least often while resident (ties: least recently used).

    The ranks ``(uses, last use, key)`` live in a heap with lazy deletion: a use or a load
    pushes the key's new rank, and a victim pops ranks that are out of date or of keys no
    longer resident until the top is current (protected keys are set aside and pushed back).
    A victim costs O(log n) amortised; the heap is rebuilt from the current ranks when stale
    entries outnumber live ones, so it stays O(resident) in size.
    """

    uses_scores = False

    def __init__(self) -> None:
        self._clock = 0
        self._count: dict[SlotKey, int] = {}
        self._last_use: dict[SlotKey, int] = {}
        self._heap: list[tuple[int, int, SlotKey]] = []

    def record_use(self, key: SlotKey, step: int) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last_use[key] = self._clock
        self._push(key)

    def record_load(self, key: SlotKey) -> None:
        if key not in self._count:
            self._push(key)  # (0, 0): never used, the first to go

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        return None

    def _rank(self, key: SlotKey) -> tuple[int, int, SlotKey]:
        return self._count.get(key, 0), self._last_use.get(key, 0), key

    def _push(self, key: SlotKey) -> None:
        heapq.heappush(self._heap, self._rank(key))
        if len(self._heap) > 4 * len(self._count) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        ranks = {entry[2]: self._rank(entry[2]) for entry in self._heap}
        self._heap = list(ranks.values())
        heapq.heapify(self._heap)

    def victim(self, resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> SlotKey:
        aside: list[tuple[int, int, SlotKey]] = []
        try:
            while self._heap:
                entry = self._heap[0]
                key = entry[2]
                if key not in resident or entry != self._rank(key):
                    heapq.heappop(self._heap)  # out of date or gone: drop for good
                elif key in protected:
                    aside.append(heapq.heappop(self._heap))
                else:
                    return key
        finally:
            for entry in aside:
                heapq.heappush(self._heap, entry)
        unknown = [k for k in resident if k not in protected]  # resident, never reported
        if not unknown:
            raise RuntimeError("every resident expert is protected; the cache is below its minimum")
        return min(unknown, key=self._rank)

    def forget(self, key: SlotKey) -> None:
        self._count.pop(key, None)
        self._last_use.pop(key, None)


def _score_policy_factory(window: int) -> EvictionPolicy:
    try:
        from engine.offload import score_eviction  # helper module, added with issue 4
    except ImportError as error:
        raise InvalidRequestError(
            "score-based eviction is not available in this build; use LRU or LFU"
        ) from error
    factory: Callable[[int], EvictionPolicy] = score_eviction.make_policy
    return factory(window)


def make_policy(name: str, window: int = 8) -> EvictionPolicy:
    """A fresh policy by name: ``lru``, ``lfu`` or ``score`` (windowed mean gate score)."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "score":
        return _score_policy_factory(window)
    raise InvalidRequestError(f"unknown eviction policy {name!r}; choose lru, lfu or score")
