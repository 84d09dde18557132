"""The slot cache, eviction policies and counters, on a small hand-filled host store."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.offload.cache import ExpertCache
from engine.offload.eviction import LFUPolicy, LRUPolicy, make_policy
from engine.offload.stats import OffloadStats
from engine.offload.store import ExpertShape, HostExpertStore

SHAPE = ExpertShape(hidden=4, intermediate=2, dtype=torch.float32)
LAYERS = [0, 1, 2]
EXPERTS = 4


def _store() -> HostExpertStore:
    store = HostExpertStore(SHAPE, LAYERS, EXPERTS, pin=False)
    for layer in LAYERS:
        for expert in range(EXPERTS):
            store.row((layer, expert)).fill_(10 * layer + expert)
    return store


def _cache(slots: int, policy: str = "lru") -> ExpertCache:
    stats = OffloadStats(LAYERS, slots, slots * SHAPE.nbytes)
    return ExpertCache(_store(), slots, torch.device("cpu"), make_policy(policy), stats)


def _use(cache: ExpertCache, layer: int, experts: list[int]) -> None:
    for _ in cache.stream(layer, experts):
        pass


def test_layout_is_aligned_and_views_hold_the_expert() -> None:
    cache = _cache(2)
    _use(cache, 1, [3])
    gate_up, down = cache.weights((1, 3))
    assert gate_up.shape == (4, 4) and down.shape == (4, 2)
    assert torch.all(gate_up == 13) and torch.all(down == 13)
    assert SHAPE.down_offset % 128 == 0 and SHAPE.numel % 128 == 0
    assert gate_up.is_contiguous() and down.is_contiguous()


def test_hits_misses_and_bytes_are_counted_per_layer() -> None:
    cache = _cache(3)
    _use(cache, 0, [0, 1])
    _use(cache, 0, [1, 2])
    _use(cache, 2, [0])
    snap = cache.stats.snapshot()
    layer0, layer1, layer2 = snap.per_layer
    assert (layer0.hits, layer0.misses, layer0.transfers) == (1, 3, 3)
    assert layer0.bytes_moved == 3 * SHAPE.nbytes
    assert (layer1.hits, layer1.misses) == (0, 0)
    assert (layer2.misses, layer2.transfers) == (1, 1)
    assert snap.transfers == 4 and snap.bytes_moved == 4 * SHAPE.nbytes
    assert snap.cache_slots == 3 and snap.cache_bytes == 3 * SHAPE.nbytes


def test_lru_evicts_least_recently_used_and_reuses_its_slot() -> None:
    cache = _cache(2)
    _use(cache, 0, [0])
    _use(cache, 0, [1])
    _use(cache, 0, [0])  # 1 is now least recently used
    _use(cache, 1, [2])
    assert cache.is_resident((0, 0)) and cache.is_resident((1, 2))
    assert not cache.is_resident((0, 1))
    assert torch.all(cache.weights((1, 2))[0] == 12)  # the freed slot was overwritten in place


def test_lfu_evicts_least_frequently_used() -> None:
    cache = _cache(2, "lfu")
    for _ in range(3):
        _use(cache, 0, [0])
    _use(cache, 0, [1])
    _use(cache, 0, [1])
    _use(cache, 0, [0])  # 0: 4 uses, 1: 2 uses, 1 also least recent
    _use(cache, 0, [2])
    assert cache.is_resident((0, 0)) and not cache.is_resident((0, 1))


def test_stream_chunks_ascending_within_the_pool_and_protected() -> None:
    cache = _cache(2)
    seen: list[list[int]] = []
    for chunk in cache.stream(0, [3, 0, 2, 1]):
        experts = [expert for expert, _, _ in chunk]
        seen.append(experts)
        assert all(cache.is_resident((0, e)) for e in experts)
        assert all(torch.all(gate_up == e) for e, gate_up, _ in chunk)
    assert seen == [[0, 1], [2, 3]]
    assert cache.stats.snapshot().transfers == 4


def test_protected_experts_are_never_victims() -> None:
    cache = _cache(2)
    _use(cache, 0, [0, 1])
    with cache.protect(1, [0]):
        assert cache.is_resident((1, 0))
        with cache.protect(1, [1]):  # must evict one of layer 0's experts, never (1, 0)
            assert cache.is_resident((1, 0)) and cache.is_resident((1, 1))


def test_more_experts_than_slots_cannot_be_protected_at_once() -> None:
    cache = _cache(2)
    with (
        pytest.raises(ValueError, match="3 experts cannot be resident in 2 slots"),
        cache.protect(0, [0, 1, 2]),
    ):
        pass


def test_policies_refuse_when_everything_is_protected() -> None:
    for policy in (LRUPolicy(), LFUPolicy()):
        with pytest.raises(RuntimeError, match="protected"):
            policy.victim([(0, 0)], {(0, 0)})


def test_lru_and_lfu_on_tables() -> None:
    lru, lfu = LRUPolicy(), LFUPolicy()
    for step, key in enumerate([(0, 1), (0, 2), (0, 1), (0, 3), (0, 1)]):
        lru.record_use(key, step)
        lfu.record_use(key, step)
    resident = [(0, 1), (0, 2), (0, 3)]
    assert lru.victim(resident, set()) == (0, 2)
    assert lru.victim(resident, {(0, 2)}) == (0, 3)
    assert lfu.victim(resident, set()) == (0, 2)  # 2 and 3 used once; 2 less recently
    lfu.forget((0, 1))
    assert lfu.victim(resident, {(0, 2), (0, 3)}) == (0, 1)


def test_resident_mask_end_step_and_reset() -> None:
    cache = _cache(3)
    _use(cache, 1, [0, 2])
    assert cache.resident_mask(1).tolist() == [True, False, True, False]
    assert not cache.resident_mask(0).any()
    cache.stats.end_step(2)
    _use(cache, 1, [0])
    cache.stats.end_step(1)
    snap = cache.stats.snapshot()
    assert snap.tokens == 3
    assert snap.bytes_per_token_history == (SHAPE.nbytes, 0)
    cache.stats.reset()
    snap = cache.stats.snapshot()
    assert snap.tokens == 0 and snap.hits == 0 and snap.bytes_per_token_history == ()
    with pytest.raises(ValueError, match="at least one token"):
        cache.stats.end_step(0)


def test_switching_policy_keeps_residents() -> None:
    cache = _cache(2)
    _use(cache, 0, [0, 1])
    cache.set_policy(LFUPolicy())
    _use(cache, 0, [1])
    _use(cache, 0, [2])
    assert cache.is_resident((0, 1)) and cache.is_resident((0, 2))


def test_make_policy_names() -> None:
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("lfu"), LFUPolicy)
    with pytest.raises(InvalidRequestError, match="unknown eviction policy"):
        make_policy("fifo")
    if importlib.util.find_spec("engine.offload.score_eviction") is None:
        with pytest.raises(InvalidRequestError, match="score-based eviction"):
            make_policy("score")
    else:
        assert hasattr(make_policy("score", 4), "victim")


def test_resident_masks_follow_every_load_and_eviction() -> None:
    cache = _cache(3, "lfu")
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        layer = int(torch.randint(0, len(LAYERS), (1,), generator=generator))
        experts = torch.randperm(EXPERTS, generator=generator)[:2].tolist()
        _use(cache, layer, experts)
        for check in LAYERS:
            want = [cache.is_resident((check, e)) for e in range(EXPERTS)]
            assert cache.resident_mask(check).tolist() == want
    assert sum(int(cache.resident_mask(layer).sum()) for layer in LAYERS) == 3
    cache.clear()
    assert not any(cache.resident_mask(layer).any() for layer in LAYERS)


def _lfu_scan_victim(
    count: dict[tuple[int, int], int],
    last: dict[tuple[int, int], int],
    resident: set[tuple[int, int]],
    protected: set[tuple[int, int]],
) -> tuple[int, int]:
    """The O(resident) LFU rule: fewest uses, then least recent, then the lowest key."""
    candidates = [key for key in resident if key not in protected]
    return min(candidates, key=lambda key: (count.get(key, 0), last.get(key, 0), key))


def test_lfu_heap_victim_equals_the_scan_on_random_traffic() -> None:
    """The heap with lazy deletion picks what a scan of every resident key picks."""
    import random

    rng = random.Random(3)
    policy = LFUPolicy()
    count: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    resident: set[tuple[int, int]] = set()
    clock = 0
    for step in range(4000):
        key = (rng.randrange(3), rng.randrange(6))
        if key not in resident:
            if len(resident) >= 8:
                protected = set(rng.sample(sorted(resident), rng.randrange(4)))
                victim = policy.victim(resident, protected)
                assert victim == _lfu_scan_victim(count, last, resident, protected), step
                resident.discard(victim)
                policy.forget(victim)
                count.pop(victim, None)
                last.pop(victim, None)
            resident.add(key)
            policy.record_load(key)
        if rng.random() < 0.8:  # a use; otherwise a prefetch that is not used (yet)
            clock += 1
            count[key] = count.get(key, 0) + 1
            last[key] = clock
            policy.record_use(key, step)
    assert len(policy._heap) <= 4 * len(resident) + 64 + 1


def test_a_pool_holding_every_expert_serves_full_layers_without_policy_records() -> None:
    cache = _cache(len(LAYERS) * EXPERTS)
    assert cache.holds_all and not _cache(len(LAYERS) * EXPERTS - 1).holds_all
    _use(cache, 1, [0, 1])
    _use(cache, 1, [2, 3])  # layer 1 now wholly resident
    uses: list[tuple[int, int]] = []
    cache.policy.record_use = lambda key, step: uses.append(key)  # type: ignore[method-assign]
    chunks = list(cache.stream(1, [3, 0]))
    assert [[e for e, _, _ in chunk] for chunk in chunks] == [[0, 3]], "one ascending chunk"
    assert torch.all(chunks[0][1][1] == 13), "the expert's own slot"
    assert uses == [], "a pool that never evicts needs no use records"
    _use(cache, 0, [2])  # a layer not wholly resident goes the protected way
    assert uses == [(0, 2)]
    layer1 = cache.stats.snapshot().per_layer[1]
    assert (layer1.hits, layer1.misses) == (2, 4), "the fast path still counts its hits"
    cache.clear()
    _use(cache, 1, [0])
    assert cache.stats.snapshot().per_layer[1].misses == 5, "cleared: copied again"
