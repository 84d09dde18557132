"""Replay of real routing traces through the eviction policies, with a shuffled control.

The traces (``traces/README.md`` in the shared reference folder: ``.npz`` files of real Mixtral
and Qwen1.5-MoE routing) record only the selected experts and their weights, so only policies
that run on selected experts can be replayed: LRU, LFU, and score-windowed eviction on the
recorded weights (an unselected expert scores 0). Substitution needs full score vectors and
cannot be replayed from them.

Each sequence is replayed in its own token order (Qwen rows interleave 25 requests; they are
grouped by ``seq_id``) with one cache that carries over from one sequence to the next, either
one pool per layer (``fraction`` of that layer's experts) or one global pool over all traced
layers. The experts of the token being computed are protected. The control shuffles the token
order within each sequence: locality that survives the shuffle is not locality.

The folder is always passed in; nothing here knows where the traces live.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.offload.eviction import EvictionPolicy, LFUPolicy, LRUPolicy
from engine.offload.score_eviction import ScoreEviction

Pool = Literal["layer", "global"]
PolicyFactory = Callable[[], EvictionPolicy]
FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
POOLS: tuple[Pool, ...] = ("layer", "global")


@dataclass(frozen=True)
class Trace:
    """One routing trace: ``experts``/``weights`` are [tokens, layers, k]."""

    name: str
    experts: np.ndarray  # [N, L, k] int, -1 where the source lost a row
    weights: np.ndarray  # [N, L, k] float32
    seq_id: np.ndarray  # [N]
    pos: np.ndarray  # [N]
    num_experts: int
    top_k: int
    phase: str
    meta: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])


def load_trace(path: Path) -> Trace:
    """Read one ``.npz`` trace; a malformed file raises ``ValueError`` naming it."""
    with np.load(path) as data:
        try:
            meta = json.loads(str(data["meta"]))
            experts = data["experts"].astype(np.int64)
            trace = Trace(
                name=path.stem,
                experts=experts,
                weights=data["weights"].astype(np.float32),
                seq_id=data["seq_id"].astype(np.int64),
                pos=data["pos"].astype(np.int64),
                num_experts=int(meta["num_experts"]),
                top_k=int(meta["top_k"]),
                phase=str(meta.get("phase", "")),
                meta=meta,
            )
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path.name} is not a routing trace: {error}") from error
    if experts.ndim != 3 or experts.shape[2] != trace.top_k:
        raise ValueError(f"{path.name}: experts must be [tokens, layers, {trace.top_k}]")
    return trace


def find_traces(folder: Path, phase: str | None = "decode") -> list[Path]:
    """The trace files in ``folder`` (sorted), optionally of one phase by file name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no trace folder at {folder}")
    files = sorted(folder.glob("*.npz"))
    return [f for f in files if phase is None or f"_{phase}" in f.stem]


def sequences(trace: Trace) -> list[np.ndarray]:
    """Row indices of each sequence, in ``seq_id`` order and then token position order."""
    order = np.lexsort((trace.pos, trace.seq_id))
    ids = trace.seq_id[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    return list(np.split(order, cuts))


def shuffled(trace: Trace, seed: int = 0) -> Trace:
    """The control: token order permuted within each sequence, rows kept whole."""
    rng = np.random.default_rng(seed)
    groups = sequences(trace)
    rows = np.concatenate([rng.permutation(seq) for seq in groups])
    return replace(
        trace,
        name=f"{trace.name} (shuffled)",
        experts=trace.experts[rows],
        weights=trace.weights[rows],
        seq_id=trace.seq_id[rows],
        pos=np.concatenate([np.arange(len(seq)) for seq in groups]),
    )


@dataclass
class _Cache:
    """Resident set of one pool, driven by an eviction policy (simulation only)."""

    capacity: int
    policy: EvictionPolicy
    resident: dict[tuple[int, int], None]
    hits: int = 0
    accesses: int = 0

    def access(self, layer: int, experts: Sequence[int], step: int) -> None:
        protected = {(layer, e) for e in experts}
        for e in experts:
            key = (layer, e)
            self.accesses += 1
            if key in self.resident:
                self.hits += 1
            else:
                if len(self.resident) >= self.capacity:
                    gone = self.policy.victim(list(self.resident), protected)
                    del self.resident[gone]
                    self.policy.forget(gone)
                self.resident[key] = None
            self.policy.record_use(key, step)


def _steps(trace: Trace) -> Iterator[tuple[int, int]]:
    """(step, row) over every sequence in order; the step counter runs on across sequences."""
    step = 0
    for seq in sequences(trace):
        for row in seq:
            yield step, int(row)
            step += 1


def _feed(cache: _Cache, trace: Trace, layer: int, row: int, step: int, key_layer: int) -> None:
    experts = trace.experts[row, layer]
    if (experts < 0).any():
        return  # the source lost this row for this layer
    scores = np.zeros(trace.num_experts, dtype=np.float32)
    scores[experts] = trace.weights[row, layer]
    cache.policy.record_scores(key_layer, torch.from_numpy(scores), step)
    cache.access(key_layer, experts.tolist(), step)


def replay_layer_pools(
    trace: Trace, factory: PolicyFactory, fraction: float
) -> list[tuple[int, int]]:
    """(hits, accesses) of each layer, each with its own pool of ``fraction`` of its experts."""
    capacity = max(trace.top_k, round(fraction * trace.num_experts))
    results = []
    for layer in range(trace.num_layers):
        cache = _Cache(capacity, factory(), {})
        for step, row in _steps(trace):
            _feed(cache, trace, layer, row, step, layer)
        results.append((cache.hits, cache.accesses))
    return results


def replay_global_pool(trace: Trace, factory: PolicyFactory, fraction: float) -> tuple[int, int]:
    """(hits, accesses) with one pool of ``fraction`` of all traced experts, layers in order."""
    total = trace.num_experts * trace.num_layers
    cache = _Cache(max(trace.top_k, round(fraction * total)), factory(), {})
    for step, row in _steps(trace):
        for layer in range(trace.num_layers):
            _feed(cache, trace, layer, row, step, layer)
    return cache.hits, cache.accesses


def default_policies(windows: Sequence[int] = (8,)) -> dict[str, PolicyFactory]:
    """LRU, LFU and score-windowed eviction (relative scale) for each window."""
    policies: dict[str, PolicyFactory] = {"lru": LRUPolicy, "lfu": LFUPolicy}
    for n in windows:
        policies[f"score-w{n}"] = _score_factory(n)
    return policies


def _score_factory(window: int, scale: str = "relative") -> PolicyFactory:
    def build() -> EvictionPolicy:
        return ScoreEviction(window=window, scale=scale)  # type: ignore[arg-type]

    return build


@dataclass(frozen=True)
class ReplayRow:
    """One policy on one trace at one cache size."""

    trace: str
    model: str
    policy: str
    pool: Pool
    fraction: float
    shuffled: bool
    hits: int
    accesses: int
    mean_layer_hit_rate: float  # the README's "mean over layers" (global pool: pooled rate)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


def replay_trace(
    trace: Trace,
    policies: Mapping[str, PolicyFactory],
    fractions: Sequence[float] = FRACTIONS,
    pools: Sequence[Pool] = POOLS,
    is_shuffled: bool = False,
) -> list[ReplayRow]:
    """Rows for every policy, pool and cache fraction on one trace."""
    rows = []
    for pool in pools:
        for fraction in fractions:
            for name, factory in policies.items():
                rows.append(_row(trace, name, factory, pool, fraction, is_shuffled))
    return rows


def _row(
    trace: Trace, name: str, factory: PolicyFactory, pool: Pool, fraction: float, shuf: bool
) -> ReplayRow:
    if pool == "layer":
        per_layer = replay_layer_pools(trace, factory, fraction)
        hits, accesses = (sum(v) for v in zip(*per_layer, strict=True))
        mean = float(np.mean([h / a for h, a in per_layer if a]))
    else:
        hits, accesses = replay_global_pool(trace, factory, fraction)
        mean = hits / accesses if accesses else 0.0
    model = str(trace.meta.get("model_family", trace.meta.get("model", "")))
    return ReplayRow(trace.name, model, name, pool, fraction, shuf, hits, accesses, mean)


def replay_folder(
    folder: Path,
    policies: Mapping[str, PolicyFactory] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    pools: Sequence[Pool] = POOLS,
    phase: str = "decode",
    shuffle_seed: int | None = 0,
) -> list[ReplayRow]:
    """Rows for every decode trace in ``folder``, plus the shuffled control when seeded."""
    chosen = default_policies() if policies is None else policies
    rows: list[ReplayRow] = []
    for path in find_traces(folder, phase):
        trace = load_trace(path)
        rows += replay_trace(trace, chosen, fractions, pools)
        if shuffle_seed is not None:
            rows += replay_trace(shuffled(trace, shuffle_seed), chosen, fractions, pools, True)
    return rows


def summary_markdown(rows: Sequence[ReplayRow]) -> str:
    """Hit rates per model, pool, cache fraction and policy: real order next to the shuffle.

    Rows of one model are pooled over its traces (hits over accesses); "layer mean" is the mean
    over traces of the mean per-layer hit rate (the README's sanity figure).
    """
    groups: dict[tuple[str, str, float, str, bool], list[ReplayRow]] = {}
    for row in rows:
        key = (row.model, row.pool, row.fraction, row.policy, row.shuffled)
        groups.setdefault(key, []).append(row)
    lines = [
        "| model | pool | cache | policy | hit rate | layer mean | shuffled | gain over shuffle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, pool, fraction, policy, shuf), group in sorted(groups.items()):
        if shuf:
            continue
        control = groups.get((model, pool, fraction, policy, True), [])
        real, ctrl = _pooled(group), _pooled(control)
        mean = float(np.mean([r.mean_layer_hit_rate for r in group]))
        lines.append(
            f"| {model} | {pool} | {fraction:.0%} | {policy} | {real:.3f} | {mean:.3f} "
            f"| {ctrl:.3f} | {real - ctrl:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def _pooled(rows: Sequence[ReplayRow]) -> float:
    accesses = sum(r.accesses for r in rows)
    return sum(r.hits for r in rows) / accesses if accesses else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.eval.traces FOLDER [--windows N ...] [--scales S ...]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Replay routing traces through eviction policies")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--windows", type=int, nargs="+", default=[8])
    parser.add_argument("--scales", nargs="+", default=["relative"])
    parser.add_argument("--pools", nargs="+", default=list(POOLS))
    args = parser.parse_args(argv)
    policies: dict[str, PolicyFactory] = {"lru": LRUPolicy, "lfu": LFUPolicy}
    for scale in args.scales:
        for n in args.windows:
            policies[f"score-w{n}-{scale}"] = _score_factory(n, scale)
    rows = replay_folder(args.folder, policies, pools=args.pools)
    print(summary_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
