"""Score-aware eviction (SMoE): evict the expert with the lowest recent mean gate score.

Implements ``engine.offload.eviction.EvictionPolicy``. Each step the cache reports a layer's
mean router score of *every* expert (selected or not, ``record_scores``); the policy keeps the
last ``window`` such vectors per layer and evicts, among unprotected resident experts, the one
whose windowed mean is lowest. Unselected experts that keep scoring well (good substitutes)
therefore stay, where LRU only sees accesses. Ties go to the least recently used.

One global pool holds experts of many layers, whose scores are not on one scale (a softmax
mean is ``1/E``; how peaked a layer's router is varies), so ``scale`` picks how a layer's means
are made comparable: ``relative`` divides by the layer's mean over its experts (an average
expert scores 1), ``rank`` uses the expert's rank within its layer in [0, 1], ``raw`` nothing.
A layer with no score yet ranks its experts as average (neutral). The policy holds no device
state: the controller reports host (numpy) vectors from the layer's one routing copy, and the
scaled table is rebuilt lazily when a victim is asked for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal

import numpy as np

ScoreScale = Literal["raw", "relative", "rank"]
SCORE_SCALES: tuple[str, ...] = ("raw", "relative", "rank")
DEFAULT_WINDOW = 8
DEFAULT_SCALE: ScoreScale = "relative"

SlotKey = tuple[int, int]  # (layer, expert)


class _LayerWindow:
    """The last ``window`` steps' score vectors of one layer (same-step reports averaged)."""

    def __init__(self, window: int) -> None:
        self.vectors: deque[np.ndarray] = deque(maxlen=window)  # each [E] fp32
        self.last_step: int | None = None
        self._merged = 0
        self._mean: np.ndarray | None = None  # cached until the next report

    def add(self, scores: Any, step: int) -> None:
        vector = scores  # [E]: the controller's host row as it is (a decode step's hot path)
        if not (type(scores) is np.ndarray and scores.dtype == np.float32 and scores.ndim == 1):
            vector = np.asarray(scores, dtype=np.float32).reshape(-1)
        self._mean = None
        if step == self.last_step and self.vectors:
            count = self._merged
            self.vectors[-1] = (self.vectors[-1] * count + vector) / (count + 1)
            self._merged = count + 1
            return
        self.vectors.append(vector.copy())
        self.last_step, self._merged = step, 1

    def mean(self) -> np.ndarray:
        if self._mean is None:  # oldest first, in float64: one stack and one reduction
            total = np.add.reduce(np.array(self.vectors), axis=0, dtype=np.float64)  # [E]
            self._mean = (total / len(self.vectors)).astype(np.float32)  # [E]
        return self._mean


def scale_scores(mean: np.ndarray, scale: ScoreScale) -> np.ndarray:
    """A layer's windowed means [E] on the common scale of the global pool."""
    mean = np.asarray(mean, dtype=np.float32)
    if scale == "raw":
        return mean
    if scale == "relative":
        average = mean.mean(dtype=np.float32)
        return mean / average if average > 0 else np.ones_like(mean)
    order = mean.argsort(kind="stable").argsort(kind="stable").astype(np.float32)  # 0 = lowest
    return order / max(1, mean.size - 1)


class ScoreEviction:
    """Evict the resident expert with the lowest windowed mean gate score."""

    def __init__(self, window: int = DEFAULT_WINDOW, scale: ScoreScale = DEFAULT_SCALE) -> None:
        if window < 1:
            raise ValueError(f"the score window must be at least 1 step; got {window}")
        if scale not in SCORE_SCALES:
            raise ValueError(f"scale must be one of {SCORE_SCALES}; got {scale!r}")
        self.window = window
        self.scale: ScoreScale = scale
        self._layers: dict[int, _LayerWindow] = {}
        self._table: dict[int, list[float]] = {}  # layer -> scaled means, rebuilt lazily
        self._last_use: dict[SlotKey, int] = {}
        self._clock = 0
        self._values: np.ndarray | None = None  # [L, E] scaled scores for victim_in
        self._value_layers: list[int] = []
        self._row_of: dict[int, int] = {}
        self._stale: set[int] = set()  # layers whose row needs rebuilding

    def record_use(self, key: SlotKey, step: int) -> None:
        self._clock += 1
        self._last_use[key] = self._clock

    def record_load(self, key: SlotKey) -> None:
        return None

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        """``scores``: [E] mean score of each expert over this step's tokens."""
        self._layers.setdefault(layer, _LayerWindow(self.window)).add(scores, step)
        self._table.pop(layer, None)
        self._stale.add(layer)

    def victim(self, resident: Collection[SlotKey], protected: AbstractSet[SlotKey]) -> SlotKey:
        candidates = [key for key in resident if key not in protected]
        if not candidates:
            raise RuntimeError("every resident expert is protected; the cache is below its minimum")
        tables = {layer: self.scaled_scores(layer) or [] for layer in self._layers}
        neutral, last_use = self._neutral(), self._last_use
        empty: list[float] = []

        def rank(key: SlotKey) -> tuple[float, int, SlotKey]:
            table = tables.get(key[0], empty)
            value = table[key[1]] if key[1] < len(table) else neutral
            return value, last_use.get(key, 0), key

        return min(candidates, key=rank)

    def victim_in(
        self, layers: Sequence[int], resident: np.ndarray, protected: AbstractSet[SlotKey]
    ) -> SlotKey:
        """``victim`` over a residency table ``[L, E]`` (rows: ``layers``), vectorised.

        Same rule and ties as ``victim``: lowest scaled score, then least recently used, then
        key order. The scaled scores live in an ``[L, E]`` table whose rows are rebuilt only
        for layers that reported since the last victim.
        """
        values = self._value_table(layers, resident.shape[1])
        free = resident.copy()
        row_of = self._row_of
        for layer, expert in protected:
            row = row_of.get(layer)
            if row is not None:
                free[row, expert] = False
        masked = np.where(free, values, np.inf)
        best = masked.min()
        if best == np.inf:
            raise RuntimeError("every resident expert is protected; the cache is below its minimum")
        tied = np.flatnonzero(masked == best)  # row-major: key order
        width = masked.shape[1]
        keys = [(layers[i // width], int(i % width)) for i in tied.tolist()]
        return keys[0] if len(keys) == 1 else min(keys, key=lambda k: self._last_use.get(k, 0))

    def _value_table(self, layers: Sequence[int], experts: int) -> np.ndarray:
        """[L, E] scaled scores (neutral where a layer has none), refreshed where stale."""
        shape = (len(layers), experts)
        if self._values is None or self._values.shape != shape or self._value_layers != layers:
            self._values = np.full(shape, self._neutral(), dtype=np.float64)
            self._value_layers = list(layers)
            self._row_of = {layer: row for row, layer in enumerate(layers)}
            self._stale = set(self._layers)
        if self.scale == "raw" and self._stale:  # the neutral value moves with every layer
            self._values[[self._row_of[x] for x in layers if x not in self._layers]] = (
                self._neutral()
            )
        for layer in self._stale:
            row = self._row_of.get(layer)
            window = self._layers.get(layer)
            if row is not None and window is not None:
                scaled = scale_scores(window.mean(), self.scale)  # [E]
                n = min(experts, scaled.size)
                self._values[row, :n] = scaled[:n]
        self._stale.clear()
        return self._values

    def forget(self, key: SlotKey) -> None:
        self._last_use.pop(key, None)

    def scaled_scores(self, layer: int) -> list[float] | None:
        """The layer's windowed means on the pool's scale; None before its first report."""
        if layer not in self._layers:
            return None
        if layer not in self._table:
            mean = self._layers[layer].mean()
            self._table[layer] = scale_scores(mean, self.scale).tolist()
        return self._table[layer]

    def _neutral(self) -> float:
        """The value of an expert whose layer has no score yet: an average one."""
        if self.scale == "relative":
            return 1.0
        if self.scale == "rank":
            return 0.5
        known = [v for layer in self._layers for v in self.scaled_scores(layer) or []]
        return sum(known) / len(known) if known else 0.0


def make_policy(window: int = DEFAULT_WINDOW, scale: ScoreScale = DEFAULT_SCALE) -> ScoreEviction:
    """Factory used by ``engine.offload.eviction.make_policy('score', window)``."""
    return ScoreEviction(window=window, scale=scale)
