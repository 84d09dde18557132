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
from collections.abc import Collection, Mapping
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
        vector = np.asarray(scores, dtype=np.float32).reshape(-1)  # [E]
        self._mean = None
        if step == self.last_step and self.vectors:
            count = self._merged
            self.vectors[-1] = (self.vectors[-1] * count + vector) / (count + 1)
            self._merged = count + 1
            return
        self.vectors.append(vector.copy())
        self.last_step, self._merged = step, 1

    def mean(self) -> np.ndarray:
        if self._mean is None:
            total = self.vectors[0].astype(np.float64)
            for vector in list(self.vectors)[1:]:
                total = total + vector
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

    def record_use(self, key: SlotKey, step: int) -> None:
        self._clock += 1
        self._last_use[key] = self._clock

    def record_load(self, key: SlotKey) -> None:
        return None

    def record_scores(self, layer: int, scores: Any, step: int) -> None:
        """``scores``: [E] mean score of each expert over this step's tokens."""
        self._layers.setdefault(layer, _LayerWindow(self.window)).add(scores, step)
        self._table.pop(layer, None)

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
        self, resident: Mapping[int, np.ndarray], protected: AbstractSet[SlotKey]
    ) -> SlotKey:
        """``victim`` over per-layer residency masks, vectorised: O(layers) numpy calls.

        Same rule and ties as ``victim``: lowest scaled score, then least recently used, then
        key order.
        """
        layers = sorted(resident)
        neutral = self._neutral()
        values = np.stack([self._values(layer, len(resident[layer]), neutral) for layer in layers])
        free = np.stack([resident[layer] for layer in layers])  # [L, E] resident
        row_of = {layer: row for row, layer in enumerate(layers)}
        for layer, expert in protected:
            if layer in row_of:
                free[row_of[layer], expert] = False
        if not free.any():
            raise RuntimeError("every resident expert is protected; the cache is below its minimum")
        masked = np.where(free, values, np.inf)
        tied = np.flatnonzero(masked == masked.min())  # row-major: key order
        keys = [(layers[i // masked.shape[1]], int(i % masked.shape[1])) for i in tied]
        return min(keys, key=lambda key: self._last_use.get(key, 0))

    def _values(self, layer: int, experts: int, neutral: float) -> np.ndarray:
        table = self.scaled_scores(layer)
        values = np.full(experts, neutral, dtype=np.float64)
        if table is not None:
            n = min(experts, len(table))
            values[:n] = table[:n]
        return values

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
