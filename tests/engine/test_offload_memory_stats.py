"""The controller's snapshot carries the allocator and pinned-host figures the live panel shows."""

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
