"""Bigger than RAM, measured with a real memory limit: a cgroup whose page cache holds half.

``python -m engine.eval.cgroup_study --out DIR`` is ``engine.eval.mmap_study`` without the
emulation: the process moves itself into a new memory cgroup (v1 ``memory`` controller or v2
``memory.max``) and the kernel, not the study, decides which pages of the mapped experts stay.
For the built-in model (or ``--model``) as its safetensors folder and as a Q4_K_M GGUF it times
greedy CPU decode, interleaved round by round, in three set-ups:

- ``in RAM``: every expert read into host memory at load, the group's limit lifted.
- ``mapped, all fit``: ``--mmap-experts``, limit lifted: the whole file can stay cached.
- ``mapped, half fit``: ``--mmap-experts`` with the group's limit set, just before the round,
  to what the process holds besides page cache plus half of the experts' bytes.

The limit charges everything the group holds (torch, the trunk, activations) and there is no
swap, so it is computed from the group's own counters at each round: anonymous memory now
(usage minus page cache) plus the page-cache budget. Each source is mapped from its own copy,
read into the page cache only by this process (a page another group brought in is charged
there and the limit would not reach it).

Where no memory cgroup can be made (no controller, read-only ``/sys/fs/cgroup``, not allowed)
it writes the reason to ``cgroup_study.json`` and exits with status 2: it never falls back to
the emulation silently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.atomic import write_text_atomic
from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.eval.mmap_study import (
    _disk_read_bytes,
    _host_store,
    _own_copy,
    interleaved,
    study_args,
    study_sources,
)
from engine.offload.mapped import MappedExpertStore
from engine.runtime.loading import LoadedModel, load_model

SETUPS = ("in RAM", "mapped, all fit", "mapped, half fit")
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup could be made here; the message says which step failed and why."""


@dataclass(frozen=True)
class MemoryGroup:
    """A memory cgroup this process moved into: read its counters, set its limit."""

    path: Path
    version: int  # 1: the v1 memory controller, 2: the unified hierarchy

    @property
    def _limit_file(self) -> Path:
        return self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")

    def stat(self) -> dict[str, int]:
        text = (self.path / "memory.stat").read_text(encoding="ascii")
        return {k: int(v) for k, v in (line.split() for line in text.splitlines())}

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text(encoding="ascii"))

    def page_cache(self) -> int:
        stat = self.stat()
        return stat["cache"] if self.version == 1 else stat["file"]

    def limit(self, nbytes: int | None) -> None:
        """Set the limit (``None``: lifted); the kernel reclaims page cache down to it."""
        value = ("-1" if self.version == 1 else "max") if nbytes is None else str(nbytes)
        self._limit_file.write_text(value, encoding="ascii")

    def remove(self) -> None:
        """Move back to the parent group and delete this one (best effort, at exit)."""
        try:
            (self.path.parent / "cgroup.procs").write_text(str(os.getpid()), encoding="ascii")
            self.path.rmdir()
        except OSError:
            pass


def _current(controller: str) -> str:
    """This process's group path for ``controller`` (``""``: the v2 unified entry)."""
    for line in Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines():
        _id, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise CgroupUnavailable(f"/proc/self/cgroup names no {controller or 'unified'} group")


def _v2_parent() -> Path:
    controllers = V2_ROOT / "cgroup.controllers"
    if not controllers.exists() or "memory" not in controllers.read_text(encoding="ascii"):
        raise CgroupUnavailable(f"no cgroup v2 memory controller at {controllers}")
    return V2_ROOT / _current("").lstrip("/")


def enter_memory_group(name: str) -> MemoryGroup:
    """Make a child memory cgroup next to this process's own, and move this process into it."""
    errors = []
    for version, parent in ((1, lambda: V1_ROOT / _current("memory").lstrip("/")),
                            (2, _v2_parent)):  # fmt: skip
        try:
            group = MemoryGroup(parent() / name, version)
            group.path.mkdir(exist_ok=True)
            (group.path / "cgroup.procs").write_text(str(os.getpid()), encoding="ascii")
            group.limit(None)
            return group
        except (OSError, CgroupUnavailable) as error:
            errors.append(f"cgroup v{version}: {error}")
    raise CgroupUnavailable("; ".join(errors))


@dataclass
class Setup:
    name: str
    loaded: LoadedModel
    expert_bytes: int  # bytes of the experts in the file: what "half fit" halves
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    disk_bytes: list[int] = field(default_factory=list)
    major_faults: list[int] = field(default_factory=list)
    page_cache: list[int] = field(default_factory=list)


def _setup(name: str, path: Path, cache: float) -> Setup:
    config = LoadConfig(
        path, device="cpu", dtype="float32", cache=CacheConfig(fraction=cache),
        live=LiveOptions(policy="lru"), mmap_experts=name != "in RAM",
    )  # fmt: skip
    loaded = load_model(config)
    return Setup(name, loaded, _expert_bytes(loaded))


def _expert_bytes(loaded: LoadedModel) -> int:
    store = _host_store(loaded)
    return sum(store.layer_shape(layer).nbytes for layer in store.layers) * store.num_experts


def _warm(setup: Setup) -> None:
    """Read every expert of a mapped set-up once (untimed): a half-fit round's limit also
    reclaimed the other set-ups' pages, and "all fit" must start with its file cached."""
    store = _host_store(setup.loaded)
    for layer in store.layers:
        for expert in range(store.num_experts):
            store.row((layer, expert))


def _decode(setup: Setup, prompt: torch.Tensor, steps: int, group: MemoryGroup) -> None:
    model = setup.loaded.model
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        disk, faults = _disk_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    setup.seconds.append(time.perf_counter() - start)
    setup.cpu_seconds.append(time.process_time() - start_cpu)
    setup.disk_bytes.append(_disk_read_bytes() - disk)
    setup.major_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
    setup.page_cache.append(group.page_cache())


def _drop_experts(setups: list[Setup]) -> None:
    """Drop every mapped set-up's expert pages from this mapping and the page cache."""
    for setup in setups:
        store = _host_store(setup.loaded)
        if isinstance(store, MappedExpertStore):
            store.drop([(layer, e) for layer in store.layers for e in range(store.num_experts)])


def _round(
    setup: Setup, everyone: list[Setup], prompt: torch.Tensor, steps: int, group: MemoryGroup,
    half: float,
) -> None:  # fmt: skip
    """One timed decode. For ``half fit`` every expert page is dropped first and the limit set
    to what the group holds then (anonymous memory, libraries, the trunk) plus the budget, so
    the experts get about that much page cache; the untimed prompt refills it."""
    if setup.name == "mapped, all fit":
        _warm(setup)
    if setup.name == "mapped, half fit":
        _drop_experts(everyone)
        group.limit(group.usage() + int(setup.expert_bytes * half))
    try:
        _decode(setup, prompt, steps, group)
    finally:
        group.limit(None)


def measure(
    sources: dict[str, Path], prompt: torch.Tensor, work: Path, group: MemoryGroup, *,
    steps: int, rounds: int, cache: float, half: float,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every set-up of every source, interleaved round by round; medians per set-up."""
    setups = []
    for index, (source, path) in enumerate(sources.items()):
        for number, name in enumerate(SETUPS):
            copy = _own_copy(path, work / f"source{index}-setup{number}")
            setups.append((source, _setup(name, copy, cache)))
    everyone = [setup for _, setup in setups]
    return interleaved(
        setups, lambda setup: _round(setup, everyone, prompt, steps, group, half), rounds,
        lambda line: print(line, flush=True), lambda setup: _summary(setup, steps),
    )  # fmt: skip


def _summary(setup: Setup, steps: int) -> dict[str, Any]:
    return {
        "tokens_per_second": steps / float(np.median(setup.seconds)),
        "tokens_per_cpu_second": steps / float(np.median(setup.cpu_seconds)),
        "spread_tokens_per_second": [steps / max(setup.seconds), steps / min(setup.seconds)],
        "disk_read_bytes_per_token": float(np.median(setup.disk_bytes)) / steps,
        "major_faults_per_token": float(np.median(setup.major_faults)) / steps,
        "group_page_cache_bytes_after": int(np.median(setup.page_cache)),
        "expert_bytes": setup.expert_bytes,
    }


def _record(args: argparse.Namespace, model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, CPU, "
        f"torch {torch.__version__}, 1 thread",
        "load_average": os.getloadavg(), "model": str(model_dir), "cache_fraction": args.cache,
        "page_cache_fraction": args.half, "steps": args.steps, "rounds": args.rounds, **extra,
    }  # fmt: skip


def main() -> None:
    args, model_dir = study_args(__doc__, 24, "--half")
    try:
        group = enter_memory_group(f"understudy-cgroup-study-{os.getpid()}")
    except CgroupUnavailable as error:
        record = _record(args, model_dir, cgroup=None, reason=str(error))
        write_text_atomic(args.out / "cgroup_study.json", json.dumps(record, indent=2))
        raise SystemExit(f"no memory cgroup can be made here: {error}") from error
    try:
        sources, prompt = study_sources(model_dir, args.out)
        results = measure(
            sources, prompt, args.out / "copies", group, steps=args.steps,
            rounds=args.rounds, cache=args.cache, half=args.half,
        )  # fmt: skip
    finally:
        group.remove()
    record = _record(args, model_dir, cgroup=f"v{group.version} {group.path}", results=results)
    write_text_atomic(args.out / "cgroup_study.json", json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
