"""Typed facts the engine reports to its callers (past tense: they already happened).

Plain dataclasses with no torch inside, so the app can import them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load would take, and what is free, before anything is read."""

    device: str
    trunk_bytes: int
    kv_cache_bytes: int
    expert_cache_bytes: int
    host_expert_bytes: int
    device_free_bytes: int | None
    host_free_bytes: int | None
    expert_slots: int = 0  # experts the cache holds (quantized or decoded slots, as loaded)
    total_experts: int = 0  # routed experts in the model; 0 where not estimated

    @property
    def device_bytes(self) -> int:
        return self.trunk_bytes + self.kv_cache_bytes + self.expert_cache_bytes

    @property
    def fits(self) -> bool:
        device_ok = self.device_free_bytes is None or self.device_bytes <= self.device_free_bytes
        host_ok = self.host_free_bytes is None or self.host_expert_bytes <= self.host_free_bytes
        return device_ok and host_ok


@dataclass(frozen=True)
class ModelInfo:
    """What ``inspect`` and the app show about a model folder."""

    path: str
    name: str
    architecture: str
    model_type: str
    num_layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    bytes_per_expert: int
    trunk_bytes: int
    total_expert_bytes: int
    vocab_size: int
    max_context: int
    router_family: str
    substitution_supported: bool
    expert_quant: str = ""  # block types the experts are kept in ("Q4_K, Q6_K"); "" = float
    expert_weights: int = 0  # weights of one expert (gate, up and down); 0 = not known


@dataclass(frozen=True)
class LayerStats:
    layer: int
    hits: int = 0
    misses: int = 0
    substitutions: int = 0
    cpu_computed: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    bytes_moved: int = 0
    transfers: int = 0


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters since the last reset, plus speed of the last generation."""

    tokens: int = 0
    hits: int = 0
    misses: int = 0
    substitutions: int = 0
    cpu_computed: int = 0
    transfers: int = 0
    bytes_moved: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_predicted_top: int = 0
    prefetch_actual_top: int = 0  # top-score experts that were not resident before the prefetch
    prefetch_top_hits: int = 0  # of those, how many the prefetch had issued
    tokens_per_second: float = 0.0
    time_to_first_token_s: float = 0.0
    cache_slots: int = 0
    cache_bytes: int = 0
    per_layer: tuple[LayerStats, ...] = field(default_factory=tuple)
    bytes_per_token_history: tuple[int, ...] = field(default_factory=tuple)
    device_allocated_bytes: int | None = None  # torch allocator on the device, if reported
    pinned_host_bytes: int | None = None  # page-locked host buffers for experts, if reported

    @property
    def hit_rate(self) -> float:
        """Share of expert uses served from the cache, substitutions counted as hits."""
        total = self.hits + self.misses + self.substitutions
        return (self.hits + self.substitutions) / total if total else 0.0

    @property
    def plain_hit_rate(self) -> float:
        total = self.hits + self.misses + self.substitutions
        return self.hits / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def substitutions_per_token(self) -> float:
        return self.substitutions / self.tokens if self.tokens else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the needed top-score experts that the prefetch had already issued."""
        if not self.prefetch_actual_top:
            return 0.0
        return self.prefetch_top_hits / self.prefetch_actual_top

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: every field plus the derived rates."""
        data = asdict(self)
        for name in DERIVED_STATS:
            data[name] = getattr(self, name)
        return data


DERIVED_STATS = (
    "hit_rate",
    "plain_hit_rate",
    "bytes_per_token",
    "misses_per_token",
    "substitutions_per_token",
    "prefetch_precision",
    "prefetch_recall",
)


@dataclass(frozen=True)
class LoadProgressed:
    fraction: float  # 0..1
    message: str


@dataclass(frozen=True)
class LoadFinished:
    info: ModelInfo
    estimate: MemoryEstimate


FLUSH_TOKEN_ID = -1  # TokenReceived.token_id of text released at the end, with no new token


@dataclass(frozen=True)
class TokenReceived:
    """One generated token and the text it released.

    ``text`` may be empty mid-character or while it could be the start of a stop string. Text
    still held back when the generation ends arrives in a last event with ``token_id`` equal to
    ``FLUSH_TOKEN_ID``; the ``text`` of all events joined equals ``GenerationFinished.text``.
    """

    text: str  # decoded text added by this token (may be empty mid-codepoint)
    token_id: int


@dataclass(frozen=True)
class GenerationFinished:
    text: str
    token_ids: tuple[int, ...]
    reason: Literal["stop", "length", "cancelled", "stop_string"]
    stats: StatsSnapshot
    prompt_tokens: int = 0
    dropped_messages: int = 0  # oldest turns dropped to fit the context


@dataclass(frozen=True)
class EngineFailed:
    """An error caught at the engine thread boundary; the thread lives on."""

    kind: str  # the error class name, e.g. "EngineOutOfMemoryError"
    message: str


Event = LoadProgressed | LoadFinished | TokenReceived | GenerationFinished | EngineFailed
