"""Controller snapshot figures: allocator and pinned-host bytes, prefetch precision and recall."""

from __future__ import annotations

from pathlib import Path

from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import load_model


def test_cpu_load_reports_no_device_allocator_and_no_pinned_memory(tiny_checkpoint: object) -> None:
    path = Path(tiny_checkpoint.path)  # type: ignore[attr-defined]
    loaded = load_model(LoadConfig(model_dir=path, device="cpu", cache=CacheConfig(fraction=0.5)))
    try:
        snapshot = loaded.offload.stats()
        assert snapshot.device_allocated_bytes is None, "no CUDA allocator on a CPU load"
        assert snapshot.pinned_host_bytes is None, "host buffers are not pinned on a CPU load"
    finally:
        loaded.offload.close()


def test_pinned_store_reports_its_size(tiny_checkpoint: object) -> None:
    path = Path(tiny_checkpoint.path)  # type: ignore[attr-defined]
    loaded = load_model(LoadConfig(model_dir=path, device="cpu", cache=CacheConfig(fraction=0.5)))
    try:
        store = loaded.offload.store
        store.pinned = True  # as on CUDA, where the buffers are page-locked
        assert loaded.offload.stats().pinned_host_bytes == store.nbytes > 0
    finally:
        loaded.offload.close()


def test_prefetch_recall_counts_only_needed_top_score_experts() -> None:
    from engine.events import StatsSnapshot

    # 5 prefetched experts were computed, but only 3 of the 4 needed top-score ones were among
    # them (the other 2 ended up used as low-score picks): recall is 3/4, not 5/4.
    snapshot = StatsSnapshot(
        prefetch_issued=6, prefetch_used=5, prefetch_actual_top=4, prefetch_top_hits=3
    )
    assert snapshot.prefetch_recall == 0.75
    assert snapshot.prefetch_precision == 5 / 6
