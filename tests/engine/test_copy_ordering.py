"""Asynchronous copies on a CPU: ordering, demand before prefetch, close and failures.

``ThreadedCopies`` copies on a worker thread with a delay per expert, the way a CUDA copy
stream runs behind the host, so what the CUDA path relies on is checked here without a GPU:
compute waits for exactly the experts still arriving, a demand miss overtakes queued
prefetches, closing waits for copies in flight, and a failed copy is a typed error that leaves
the cache usable.
"""

from __future__ import annotations

import torch

from engine.offload.cache import ExpertCache
from engine.offload.copies import ExpertCopyError, ThreadedCopies
from engine.offload.eviction import make_policy
from engine.offload.stats import OffloadStats
from engine.offload.store import ExpertShape, HostExpertStore

SHAPE = ExpertShape(hidden=8, intermediate=4, dtype=torch.float32)
LAYERS = [0, 1]
EXPERTS = 6


def _cache(slots: int, copies: ThreadedCopies) -> ExpertCache:
    store = HostExpertStore(SHAPE, LAYERS, EXPERTS, pin=False)
    for layer in LAYERS:
        for expert in range(EXPERTS):
            store.row((layer, expert)).fill_(10 * layer + expert + 1)
    stats = OffloadStats(LAYERS, slots, slots * SHAPE.nbytes)
    return ExpertCache(store, slots, torch.device("cpu"), make_policy("lru"), stats, copies)


def _holds(cache: ExpertCache, layer: int, expert: int) -> bool:
    gate_up, _down = cache.weights((layer, expert))
    return bool(torch.all(gate_up == 10 * layer + expert + 1))


def test_compute_waits_only_for_the_experts_still_arriving() -> None:
    copies = ThreadedCopies(delay=0.0)
    cache = _cache(4, copies)
    with cache.staged(0, [1]) as _:
        cache.wait(cache.arrival)
    copies.delay = 0.5  # from now on every copy is slow
    with cache.staged(0, [1, 2, 3]) as (ready, arriving):
        assert ready == [1] and arriving == [2, 3]
        assert _holds(cache, 0, 1), "a resident expert is computable at once"
        assert not _holds(cache, 0, 2), "an arriving expert is not there before the wait"
        cache.wait(cache.arrival)
        assert _holds(cache, 0, 2) and _holds(cache, 0, 3)
    cache.close()


def test_a_demand_miss_overtakes_queued_prefetches() -> None:
    copies = ThreadedCopies(delay=0.1)
    cache = _cache(6, copies)
    for expert in (0, 1, 2, 3):
        cache.prefetch([(0, expert)])  # four batches queued on the prefetch queue
    with cache.staged(1, [5]) as (_ready, arriving):
        assert arriving == [5]
        cache.wait(cache.arrival)
    cache.synchronize()
    order = [demand for demand, _slot in copies.finished]
    assert order.index(True) <= 1, f"the demand copy waited behind prefetches: {order}"
    cache.close()


def test_close_waits_for_prefetches_in_flight() -> None:
    copies = ThreadedCopies(delay=0.1)
    cache = _cache(4, copies)
    issued = cache.prefetch([(1, 0), (1, 1), (1, 2)])
    assert len(issued) == 3 and len(copies.finished) < 3
    store = cache.store
    cache.close()  # what unload does first: no copy may still read the host rows
    assert len(copies.finished) == 3
    store.close()  # freeing the host memory now is safe


def test_an_evicted_prefetch_lands_before_its_slot_is_reused() -> None:
    copies = ThreadedCopies(delay=0.2)
    cache = _cache(2, copies)
    cache.prefetch([(0, 0), (0, 1)])  # both slots claimed by slow prefetches
    with cache.staged(1, [4]) as _:  # evicts one of them while it is still copying
        cache.wait(cache.arrival)
        assert _holds(cache, 1, 4), "the late prefetch overwrote the demand copy"
    cache.close()


class FailingCopies(ThreadedCopies):
    """While ``fail`` is set, every copy reads a source of the wrong size (it raises)."""

    fail = False

    def copy(self, jobs, demand):  # type: ignore[no-untyped-def,override]
        bad = [(dst, src.new_zeros(3)) for dst, src in jobs]
        return super().copy(bad if self.fail else jobs, demand)


def test_a_failed_copy_is_a_typed_error_and_the_cache_stays_usable() -> None:
    copies = FailingCopies()
    cache = _cache(3, copies)
    copies.fail = True  # a source of the wrong size: the copy raises on the worker
    try:
        with cache.staged(0, [2]) as _:
            cache.wait(cache.arrival)
        raise AssertionError("the failed copy was not reported")
    except ExpertCopyError as error:
        assert "copying an expert failed" in str(error)
    assert not cache.is_resident((0, 2)), "a slot of unknown contents must not count"
    copies.fail = False
    with cache.staged(0, [2]) as _:
        cache.wait(cache.arrival)
        assert _holds(cache, 0, 2)
    cache.close()
