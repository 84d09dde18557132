"""The expert store's host memory: exact size, page-locked in place, safe fallback and close.

No GPU here: a fake registrar stands in for ``cudaHostRegister`` and records what it was asked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import CacheConfig, LoadConfig
from engine.offload.pinned import HostArena, Registrar
from engine.offload.store import ExpertShape, HostExpertStore
from engine.runtime.loading import inspect_model, load_model
from engine.runtime.memory import estimate_memory

SHAPE = ExpertShape(hidden=256, intermediate=96, dtype=torch.float32)


class FakeRegistrar:
    """Records register/unregister calls; fails when told to."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, int, int]] = []

    def registrar(self) -> Registrar:
        return Registrar(self._register, self._unregister)

    def _register(self, ptr: int, nbytes: int) -> str | None:
        self.calls.append(("register", ptr, nbytes))
        return self.fail

    def _unregister(self, ptr: int) -> None:
        self.calls.append(("unregister", ptr, 0))


def test_store_is_one_exact_allocation_registered_once() -> None:
    fake = FakeRegistrar()
    store = HostExpertStore(SHAPE, [1, 3, 4], 7, pin=True, registrar=fake.registrar())
    expected = 3 * 7 * SHAPE.nbytes  # no power-of-two rounding
    assert store.pinned and store.warning is None
    assert store.nbytes == expected
    assert fake.calls == [("register", store.row((1, 0)).data_ptr(), expected)]
    rows = [store.row((layer, 6)) for layer in (1, 3, 4)]
    assert rows[1].data_ptr() - rows[0].data_ptr() == 7 * SHAPE.nbytes  # layers back to back
    store.close()
    assert fake.calls[-1][0] == "unregister" and not store.pinned


def test_refused_pinning_falls_back_to_pageable_with_the_cost_said() -> None:
    fake = FakeRegistrar(fail="cudaHostRegister returned error 2")
    store = HostExpertStore(SHAPE, [0], 4, pin=True, registrar=fake.registrar())
    assert not store.pinned
    assert store.warning is not None and "half the bandwidth" in store.warning
    store.row((0, 3)).fill_(1.0)  # still usable
    store.close()
    assert [c[0] for c in fake.calls] == ["register"], "never unregister what was not locked"


def test_no_pinning_asked_registers_nothing() -> None:
    fake = FakeRegistrar()
    arena = HostArena(1000, torch.float32, pin=False, registrar=fake.registrar())
    assert not arena.pinned and fake.calls == []
    arena.close()
    assert fake.calls == []


_RSS_PROBE = """
from pathlib import Path
import torch
from engine.offload.store import ExpertShape, HostExpertStore

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS line")

shape = ExpertShape(hidden=1024, intermediate=700, dtype=torch.float32)  # ~8.6 MB/expert
before = rss()
store = HostExpertStore(shape, [0, 1], 5, pin=False)
print(rss() - before, store.nbytes, 2 * 5 * shape.nbytes)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_of_the_store_is_its_size() -> None:
    """RSS grows by the store's bytes (within 5%), not by a rounded-up block.

    Measured in a fresh interpreter: in the test process, memory freed by earlier tests and
    kept by the C allocator can hold the store without RSS growing at all.
    """
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    grown, nbytes, expected = (int(v) for v in probe.stdout.split())
    assert nbytes == expected
    assert abs(grown - nbytes) <= 0.05 * nbytes, (grown, nbytes)


def test_estimate_matches_the_store_a_load_allocates(tiny_checkpoint: Any) -> None:
    path: Path = tiny_checkpoint.path
    config = LoadConfig(path, device="cpu", dtype="float32", cache=CacheConfig(fraction=0.5))
    estimate = estimate_memory(inspect_model(path), config)
    loaded = load_model(config)
    allocated = loaded.offload.store.nbytes
    assert abs(allocated - estimate.host_expert_bytes) <= 0.05 * estimate.host_expert_bytes
    loaded.offload.close()
