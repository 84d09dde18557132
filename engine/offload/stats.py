"""Counters every MoE layer reports into, turned into ``engine.events.StatsSnapshot`` on demand.

Mechanism only: the cache and the experts modules call ``record_*`` as things happen; the
generation loop calls ``end_step`` after each forward so bytes can be attributed per token. All
methods take one lock, so ``snapshot`` may be called from any thread while the engine runs.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import fields

from engine.events import LayerStats, StatsSnapshot

HISTORY_LENGTH = 4096  # bytes-per-token entries kept (one per step)
COUNTER_NAMES = tuple(f.name for f in fields(LayerStats) if f.name != "layer")


def _zero_counters() -> dict[str, int]:
    """One layer's counters, named as ``LayerStats`` names them."""
    return dict.fromkeys(COUNTER_NAMES, 0)


class OffloadStats:
    """Thread-safe hit/miss/transfer counters per layer and per step."""

    def __init__(self, layers: list[int], cache_slots: int, cache_bytes: int) -> None:
        self._lock = threading.Lock()
        self._layers = list(layers)
        self.cache_slots = cache_slots
        self.cache_bytes = cache_bytes
        self._counters = {layer: _zero_counters() for layer in self._layers}
        self._tokens = 0
        self._step_bytes = 0
        self._history: deque[int] = deque(maxlen=HISTORY_LENGTH)
        self._extra = {
            "prefetch_predicted_top": 0,
            "prefetch_actual_top": 0,
            "prefetch_top_hits": 0,
        }

    def add(self, layer: int, **counts: int) -> None:
        """Add to named counters of one layer, e.g. ``add(3, hits=2, misses=1)``."""
        with self._lock:
            counters = self._counters[layer]
            for name, value in counts.items():
                counters[name] += value  # KeyError for a name LayerStats does not have
            self._step_bytes += counts.get("bytes_moved", 0)

    def add_prefetch(
        self, layer: int, used: int, predicted_top: int, actual_top: int, top_hits: int
    ) -> None:
        """One layer's prefetch outcome under one lock: issued copies it computed (``used``),
        predicted and needed top-score experts, and their overlap."""
        with self._lock:
            self._counters[layer]["prefetch_used"] += used
            self._extra["prefetch_predicted_top"] += predicted_top
            self._extra["prefetch_actual_top"] += actual_top
            self._extra["prefetch_top_hits"] += top_hits

    def end_step(self, num_tokens: int) -> None:
        """Close one forward of ``num_tokens`` tokens: record its bytes moved per token."""
        if num_tokens < 1:
            raise ValueError(f"a step has at least one token; got {num_tokens}")
        with self._lock:
            self._tokens += num_tokens
            self._history.append(self._step_bytes // num_tokens)
            self._step_bytes = 0

    def reset(self) -> None:
        with self._lock:
            self._counters = {layer: _zero_counters() for layer in self._layers}
            self._tokens = 0
            self._step_bytes = 0
            self._history.clear()
            self._extra = dict.fromkeys(self._extra, 0)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            per_layer = tuple(
                LayerStats(layer=layer, **self._counters[layer]) for layer in self._layers
            )
            history = tuple(self._history)
            tokens = self._tokens
            extra = dict(self._extra)
        return StatsSnapshot(
            tokens=tokens,
            hits=sum(s.hits for s in per_layer),
            misses=sum(s.misses for s in per_layer),
            substitutions=sum(s.substitutions for s in per_layer),
            cpu_computed=sum(s.cpu_computed for s in per_layer),
            transfers=sum(s.transfers for s in per_layer),
            bytes_moved=sum(s.bytes_moved for s in per_layer),
            prefetch_issued=sum(s.prefetched for s in per_layer),
            prefetch_used=sum(s.prefetch_used for s in per_layer),
            prefetch_predicted_top=extra["prefetch_predicted_top"],
            prefetch_actual_top=extra["prefetch_actual_top"],
            prefetch_top_hits=extra["prefetch_top_hits"],
            cache_slots=self.cache_slots,
            cache_bytes=self.cache_bytes,
            per_layer=per_layer,
            bytes_per_token_history=history,
        )
