"""Which resident expert leaves the device cache: the policy interface, LRU and LFU.

Policies are pure bookkeeping: the cache tells them about uses (``record_use``) and, every
forward, about each layer's mean router scores (``record_scores``); when it needs a slot it asks
for a ``victim`` among the resident experts that are not protected (the experts of the layer
being computed). Policies never touch tensors on the device or move data.

LRU is the mixtral-offloading baseline (a use refreshes recency); an expert loaded without a use
(a prefetch) counts as the least recent. It keeps its keys in recency order, so a victim costs
O(1) amortised (it skips only protected keys) instead of a scan of every resident slot.
LFU counts uses since the expert was last loaded (``forget`` resets it), ties broken by recency;
its victim is a scan (O(resident)).
The score-windowed policy of the paper lives in ``engine/offload/score_eviction.py``.
"""

from __future__ import annotations

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


def _candidates(resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> list[SlotKey]:
    candidates = [key for key in resident if key not in protected]
    if not candidates:
        raise RuntimeError("every resident expert is protected; the cache is below its minimum")
    return candidates


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
    """Evict the expert used least often while resident (ties: least recently used)."""

    uses_scores = False

    def __init__(self) -> None:
        self._clock = 0
        self._count: dict[SlotKey, int] = {}
        self._last_use: dict[SlotKey, int] = {}

    def record_use(self, key: SlotKey, step: int) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last_use[key] = self._clock

    def record_load(self, key: SlotKey) -> None:
        return None

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        return None

    def victim(self, resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> SlotKey:
        def rank(key: SlotKey) -> tuple[int, int, SlotKey]:
            return self._count.get(key, 0), self._last_use.get(key, 0), key

        return min(_candidates(resident, protected), key=rank)

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
