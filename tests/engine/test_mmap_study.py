"""The page-cache emulation behind ``engine.eval.mmap_study``: an LRU of expert reads.

``PageCacheLimit`` must keep the most recently read experts up to its byte budget and drop the
pages of the rest, and ``restore`` must drop everything outside it (what another set-up read).
"""

from __future__ import annotations

import mmap

import torch

from engine.eval.mmap_study import PageCacheLimit
from engine.offload.mapped import PAGE, MappedRange

Key = tuple[int, int]


class _FakeStore:
    """Two layers of three experts, one page each; records what was dropped."""

    layers = (0, 1)
    num_experts = 3

    def __init__(self) -> None:
        self.mapping = mmap.mmap(-1, PAGE * 6)
        self.dropped: list[Key] = []

    def ranges(self, key: Key) -> list[MappedRange]:
        index = key[0] * 3 + key[1]
        return [MappedRange(self.mapping, "unused", index * PAGE, PAGE)]

    def drop(self, keys: list[Key]) -> None:
        self.dropped.extend(keys)

    def row(self, key: Key) -> torch.Tensor:
        return torch.zeros(1)


def test_least_recently_read_experts_beyond_the_budget_are_dropped() -> None:
    store = _FakeStore()
    limit = PageCacheLimit(store, budget=2 * PAGE)  # type: ignore[arg-type]
    for key in [(0, 0), (0, 1), (1, 2)]:
        store.row(key)
    limit.settle()
    assert store.dropped == [(0, 0)], "the oldest read must go first"
    store.row((0, 1))  # read again: now the most recent
    store.row((1, 0))
    limit.settle()
    assert store.dropped == [(0, 0), (1, 2)], store.dropped
    assert limit.dropped == 2


def test_restore_drops_everything_outside_the_emulated_cache() -> None:
    store = _FakeStore()
    limit = PageCacheLimit(store, budget=2 * PAGE)  # type: ignore[arg-type]
    store.row((1, 1))
    limit.restore()
    assert sorted(store.dropped) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]
