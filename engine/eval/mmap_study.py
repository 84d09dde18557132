"""Bigger than RAM, measured: decode speed with the experts in a page cache that holds half.

``python -m engine.eval.mmap_study --out DIR`` loads the built-in model (or ``--model``) as its
safetensors folder and as a Q4_K_M GGUF converted into ``DIR``, and for each times greedy CPU
decode, interleaved round by round, in four set-ups:

- ``in RAM``: every expert read into host memory at load (the default).
- ``mapped, all cached``: ``--mmap-experts``, the file's pages all in the page cache.
- ``mapped, half cached``: ``--mmap-experts`` with a page cache that holds only half of the
  experts' bytes, without read-ahead.
- ``mapped, half cached, read-ahead``: the same with the store's read-ahead on (every miss and
  prefetch of the step ``madvise(MADV_WILLNEED)``'d before the first is read).

**How half a page cache is made.** This is an emulation, not a memory-limited cgroup: after
every token, ``PageCacheLimit`` keeps the experts read most recently up to the budget and drops
the pages of the rest (``madvise(MADV_DONTNEED)`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``), so
the kernel must read them from the disk again; the dropping is not timed. The kernel's own
fault read-around still reads neighbouring pages, as it would with a real small page cache.
``/proc/self/io`` ``read_bytes`` per token shows the disk reads really happen.

Writes ``mmap_study.json`` and prints it. The time per configuration is dominated by decode;
the built-in model takes a few minutes in all on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.atomic import write_text_atomic
from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.offload.mapped import MappedExpertStore
from engine.offload.store import DecodedStore, HostExpertStore, SlotKey
from engine.paths import builtin_model_dir
from engine.runtime.loading import LoadedModel, load_model

SETUPS = ("in RAM", "mapped, all cached", "mapped, half cached", "mapped, half cached, read-ahead")
LAYER_AHEAD = (  # policy smoe (prefetch): read-ahead when the copy starts vs a layer earlier
    "smoe, half cached, read-ahead per layer",
    "smoe, half cached, read-ahead a layer ahead",
)


class PageCacheLimit:
    """An LRU page cache of ``budget`` bytes emulated over a mapped store's expert reads.

    Every ``row`` read marks the expert most recent; ``settle`` drops the pages of the least
    recent experts beyond the budget. Policy (which to drop) here, mechanism in the store.
    """

    def __init__(self, store: MappedExpertStore, budget: int) -> None:
        self.store = store
        self.budget = budget
        self._recent: OrderedDict[SlotKey, int] = OrderedDict()  # key -> page bytes
        self.dropped = 0
        _around_reads(store, self._touch, lambda: None)

    def _touch(self, key: SlotKey) -> None:
        if key not in self._recent:
            self._recent[key] = sum(r.pages()[1] for r in self.store.ranges(key))
        self._recent.move_to_end(key)

    def settle(self) -> None:
        """Drop the least recently read experts until the rest fit the budget."""
        total, victims = sum(self._recent.values()), []
        while total > self.budget and self._recent:
            key, size = self._recent.popitem(last=False)
            victims.append(key)
            total -= size
        self.store.drop(victims)
        self.dropped += len(victims)

    def restore(self) -> None:
        """Drop every expert outside the emulated cache (another set-up may have read it)."""
        keep = set(self._recent)
        every = ((layer, e) for layer in self.store.layers for e in range(self.store.num_experts))
        self.store.drop([key for key in every if key not in keep])


@dataclass
class Setup:
    """One loaded model, how its host tier is limited, and what was measured."""

    name: str
    loaded: LoadedModel
    limit: PageCacheLimit | None = None
    read_seconds: float = 0.0  # time inside the host store's row reads (file reads when mapped)
    reads: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    disk_bytes: list[int] = field(default_factory=list)
    major_faults: list[int] = field(default_factory=list)


def _host_store(loaded: LoadedModel) -> HostExpertStore:
    store = loaded.offload.store
    return store.inner if isinstance(store, DecodedStore) else store


def _mapped_store(loaded: LoadedModel) -> MappedExpertStore:
    store = _host_store(loaded)
    assert isinstance(store, MappedExpertStore), "mapped set-ups load with mmap_experts"
    return store


def _around_reads(
    store: HostExpertStore, before: Callable[[SlotKey], None], after: Callable[[], None]
) -> None:
    """Call ``before(key)`` and ``after()`` around every read of an expert from ``store``.

    Reads are ``row`` calls, and on a mapped store ``row_into`` too (a CPU slot filled straight
    from the mapping); an in-RAM store's ``row_into`` goes through ``row``, counted once.
    """
    names = ("row", "row_into") if isinstance(store, MappedExpertStore) else ("row",)
    for name in names:
        read = getattr(store, name)

        def wrapped(key: SlotKey, *rest: Any, _read: Any = read) -> Any:
            before(key)
            try:
                return _read(key, *rest)
            finally:
                after()

        setattr(store, name, wrapped)


def _time_reads(setup: Setup) -> None:
    """Add the time of every expert read (a page fault's wait included) to the set-up."""
    started: list[float] = []

    def before(_key: SlotKey) -> None:
        started.append(time.perf_counter())

    def after() -> None:
        setup.read_seconds += time.perf_counter() - started.pop()

    _around_reads(_host_store(setup.loaded), before, after)


def _own_copy(path: Path, folder: Path) -> Path:
    """``path`` (a file or a model folder) copied into ``folder`` and flushed to the disk.

    Each set-up reads its own copy: a page another set-up keeps mapped cannot be dropped from
    the page cache, and a dirty (not yet written) page cannot either. The copy starts out of
    the page cache (pages the copy itself wrote were found not to drop later on).
    """
    target = folder / path.name
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for file in [target, *target.rglob("*")] if target.is_dir() else [target]:
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return target


def _setup(name: str, path: Path, cache: float, page_cache: float) -> Setup:
    config = LoadConfig(
        path, device="cpu", dtype="float32", cache=CacheConfig(fraction=cache),
        live=LiveOptions(policy="smoe" if name.startswith("smoe") else "lru"),
        mmap_experts=name != "in RAM",
    )  # fmt: skip
    loaded = load_model(config)
    if "half cached" not in name:
        return _timed(Setup(name, loaded))
    store = _mapped_store(loaded)
    store.read_ahead_on = "read-ahead" in name
    store.layer_ahead = name.endswith("a layer ahead")
    every = [(layer, e) for layer in store.layers for e in range(store.num_experts)]
    total = sum(r.pages()[1] for key in every for r in store.ranges(key))
    return _timed(Setup(name, loaded, PageCacheLimit(store, int(total * page_cache))))


def _timed(setup: Setup) -> Setup:
    _time_reads(setup)
    return setup


def _disk_read_bytes() -> int:
    with open("/proc/self/io", encoding="ascii") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["read_bytes"])


def _timed_decode(setup: Setup, prompt: torch.Tensor, steps: int) -> None:
    """Greedy decode of ``steps`` tokens; only the forwards are timed, not the page drops."""
    model, limit = setup.loaded.model, setup.limit
    if limit is not None:
        limit.restore()
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    elapsed, disk, faults = 0.0, _disk_read_bytes(), resource.getrusage(resource.RUSAGE_SELF)
    setup.read_seconds = 0.0
    with torch.no_grad():
        for _ in range(steps):
            if limit is not None:
                limit.settle()
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            elapsed += time.perf_counter() - start
    setup.seconds.append(elapsed)
    setup.reads.append(setup.read_seconds)
    setup.disk_bytes.append(_disk_read_bytes() - disk)
    after = resource.getrusage(resource.RUSAGE_SELF)
    setup.major_faults.append(after.ru_majflt - faults.ru_majflt)


def measure(
    sources: dict[str, Path],
    prompt: torch.Tensor,
    work: Path,
    *,
    steps: int,
    rounds: int,
    cache: float,
    page_cache: float,
    log: Callable[[str], None] = print,
    names: tuple[str, ...] = SETUPS,
) -> dict[str, dict[str, Any]]:
    """Every set-up of every source, interleaved round by round; medians per set-up."""
    setups = []
    for index, (source, path) in enumerate(sources.items()):
        for number, name in enumerate(names):
            copy = _own_copy(path, work / f"source{index}-setup{number}")
            setups.append((source, _setup(name, copy, cache, page_cache)))
    return interleaved(setups, lambda setup: _timed_decode(setup, prompt, steps), rounds, log,
                       lambda setup: _summary(setup, steps))  # fmt: skip


def interleaved(
    setups: list[tuple[str, Any]], run: Callable[[Any], None], rounds: int,
    log: Callable[[str], None], summary: Callable[[Any], dict[str, Any]],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``run`` every (source, set-up) once per round, round after round; then each set-up's
    ``summary`` by source and set-up name, and its model closed."""
    for number in range(rounds):
        for _source, setup in setups:
            run(setup)
        log(f"round {number + 1}/{rounds} done")
    results: dict[str, dict[str, Any]] = {}
    for source, setup in setups:
        results.setdefault(source, {})[setup.name] = summary(setup)
        setup.loaded.offload.close()
    return results


def _summary(setup: Setup, steps: int) -> dict[str, Any]:
    stats = setup.loaded.offload.stats()
    return {
        "tokens_per_second": steps / float(np.median(setup.seconds)),
        "expert_read_ms_per_token": 1000 * float(np.median(setup.reads)) / steps,
        "disk_read_bytes_per_token": float(np.median(setup.disk_bytes)) / steps,
        "major_faults_per_token": float(np.median(setup.major_faults)) / steps,
        "misses": stats.misses,
        "cache_slots": stats.cache_slots,
    }


def _ratios(results: dict[str, dict[str, Any]]) -> Iterable[str]:
    for source, rows in results.items():
        base = next(iter(rows.values()))["tokens_per_second"]  # "in RAM" unless --layer-ahead
        for name, row in rows.items():
            speed = row["tokens_per_second"]
            yield (
                f"| {source} | {name} | {speed:.2f} | {speed / base:.2f} | "
                f"{row['expert_read_ms_per_token']:.2f} | "
                f"{row['disk_read_bytes_per_token'] / 1e3:.1f} | "
                f"{row['major_faults_per_token']:.1f} |"
            )


def study_sources(model_dir: Path, out: Path) -> tuple[dict[str, Path], torch.Tensor]:
    """The model folder and a Q4_K_M GGUF of it converted into ``out``; a 32-token prompt."""
    from transformers import AutoTokenizer

    from engine.eval.quant_study import SAMPLE
    from engine.gguf.writer import convert

    gguf = convert(model_dir, out / "model-Q4_K_M.gguf", "Q4_K_M")[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer(SAMPLE.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :32]
    return {"fp32 safetensors": model_dir, "Q4_K_M GGUF": gguf}, prompt


def study_args(
    doc: str, steps: int, page_cache: str, layer_ahead: bool = False
) -> tuple[argparse.Namespace, Path]:
    """The page-cache studies' command line (``page_cache``: that option's name), parsed; one
    torch thread; the model folder; ``--out`` made."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="safetensors model folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=float, default=0.5, help="expert cache fraction")
    parser.add_argument(page_cache, type=float, default=0.5, help="page cache fraction")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rounds", type=int, default=5)
    if layer_ahead:
        parser.add_argument(
            "--layer-ahead", action="store_true",
            help="only the read-ahead comparison under policy smoe: per layer vs a layer ahead",
        )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, args.model or builtin_model_dir()


def main() -> None:
    args, model_dir = study_args(__doc__, 48, "--page-cache", layer_ahead=True)
    sources, prompt = study_sources(model_dir, args.out)
    results = measure(
        sources, prompt, args.out / "copies", steps=args.steps, rounds=args.rounds,
        cache=args.cache, page_cache=args.page_cache,
        names=LAYER_AHEAD if args.layer_ahead else SETUPS,
    )  # fmt: skip
    record = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, CPU, "
        f"torch {torch.__version__}, 1 thread",
        "model": str(model_dir), "cache_fraction": args.cache,
        "page_cache_fraction": args.page_cache, "steps": args.steps, "rounds": args.rounds,
        "page_cache": "emulated: least recently read experts dropped after every token",
        "load_average": os.getloadavg(),
        "results": results,
    }  # fmt: skip
    write_text_atomic(args.out / "mmap_study.json", json.dumps(record, indent=2))
    print(
        "| model | set-up | tok/s | vs in RAM | expert reads ms/token | disk KB/token "
        "| major faults/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for line in _ratios(results):
        print(line)


if __name__ == "__main__":
    main()
