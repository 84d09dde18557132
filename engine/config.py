"""Frozen configuration the caller builds and passes to the engine.

Everything a user can choose lives here as a validated, immutable dataclass. Nothing in this
module touches torch; it is safe to import from the app. Options that can change between two
tokens without reloading are gathered in ``LiveOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Policy = Literal["lru", "lfu", "smoe"]
Eviction = Literal["lru", "lfu", "score"]
ExpertQuant = Literal["none", "int8", "int4"]
PrefetchSource = Literal["attention", "output"]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
POLICIES: tuple[str, ...] = ("lru", "lfu", "smoe")
EVICTIONS: tuple[str, ...] = ("lru", "lfu", "score")
EXPERT_QUANTS: tuple[str, ...] = ("none", "int8", "int4")
PREFETCH_SOURCES: tuple[str, ...] = ("attention", "output")
ALPHA_MAX = 0.6
DEFAULT_CACHE_FRACTION = 0.5


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_finite(**values: float | None) -> None:
    """NaN and infinity pass every ``<``/``>`` check silently: reject them by name first."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name.replace('_', ' ')} must be a finite number; got {value}")


@dataclass(frozen=True)
class LiveOptions:
    """Method switches that may change between two tokens, without reloading.

    ``policy`` picks a preset: ``lru`` and ``lfu`` are the plain baselines (no substitution,
    prefetch or CPU assist); ``smoe`` is the whole method, whose parts the ``substitution``,
    ``prefetch`` and ``cpu_assist`` flags and ``eviction`` switch individually.
    ``prefetch_from`` picks the prefetch predictor's input: ``attention`` (the MoE layer's
    post-attention state; rides in the routing copy, one host read per layer) or ``output``
    (the layer's output, as the released code; better recall, a second host read).
    """

    policy: Policy = "lru"
    alpha: float = 0.0
    eviction: Eviction | None = None  # None: derived from the policy
    substitution: bool = True
    prefetch: bool = True
    cpu_assist: bool = True
    score_window: int = 8
    prefetch_from: PrefetchSource = "attention"

    def __post_init__(self) -> None:
        _check_finite(alpha=self.alpha)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("prefetch_from", self.prefetch_from, PREFETCH_SOURCES)
        if self.eviction is not None:
            _check_choice("eviction", self.eviction, EVICTIONS)
        if not 0.0 <= self.alpha <= ALPHA_MAX:
            raise ValueError(f"alpha must be in [0, {ALPHA_MAX}]; got {self.alpha}")
        if self.score_window < 1:
            raise ValueError(f"score_window must be at least 1; got {self.score_window}")

    @property
    def effective_eviction(self) -> Eviction:
        """The eviction rule in force: explicit, else ``score`` for smoe, else the policy."""
        if self.eviction is not None:
            return self.eviction
        return "score" if self.policy == "smoe" else self.policy

    @property
    def substitution_on(self) -> bool:
        return self.policy == "smoe" and self.substitution and self.alpha > 0.0

    @property
    def prefetch_on(self) -> bool:
        return self.policy == "smoe" and self.prefetch

    @property
    def cpu_assist_on(self) -> bool:
        return self.policy == "smoe" and self.cpu_assist


@dataclass(frozen=True)
class CacheConfig:
    """Size of the device expert cache: ``budget_gb`` or ``fraction`` of all experts."""

    budget_gb: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        _check_finite(cache_budget_GB=self.budget_gb, cache_fraction=self.fraction)
        if self.budget_gb is not None and self.fraction is not None:
            raise ValueError("give either a cache budget in GB or a fraction of experts, not both")
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"cache budget must be positive; got {self.budget_gb} GB")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"cache fraction must be in (0, 1]; got {self.fraction}")

    def slots_for(self, total_experts: int, bytes_per_expert: int) -> int:
        """Number of expert slots this budget buys (before the minimum check)."""
        if self.budget_gb is not None:
            return min(total_experts, int(self.budget_gb * 1e9) // max(1, bytes_per_expert))
        fraction = DEFAULT_CACHE_FRACTION if self.fraction is None else self.fraction
        return min(total_experts, round(fraction * total_experts))


EXPERTS_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "eager", "grouped", "batched")


@dataclass(frozen=True)
class LoadConfig:
    """Everything needed to load a model; changing any of it means reloading."""

    model_dir: Path
    device: Device = "auto"
    dtype: DType = "auto"
    context_length: int = 2048
    cache: CacheConfig = field(default_factory=CacheConfig)
    live: LiveOptions = field(default_factory=LiveOptions)
    force: bool = False  # load even when the memory estimate says it will not fit
    # how routed experts are computed: the eager loop (exact against transformers' eager
    # experts), grouped matmuls over the slot pool (exact against its grouped_mm experts) or
    # batched matmuls over gathered slots (exact against its batched_mm experts); "auto":
    # grouped on CUDA 8.0+, batched on older cards, eager on the CPU (faster there)
    experts: str = "auto"
    expert_quant: ExpertQuant = "none"  # quantize a safetensors model's routed experts at load
    mmap_experts: bool = False  # experts read from the mapped model file, not copied into RAM
    quantized_slots: bool | None = None  # quantized experts in the cache: None = CUDA only
    # CPU assist computes Q4_0/Q4_1/Q4_K experts with torch's int4 kernel (bf16 compute only),
    # not from decoded copies: faster and 4-bit in RAM, but not bit-exact. None: on CUDA, where
    # a CPU-computed expert is not bit-exact anyway (CPU vs GPU arithmetic); off on the CPU
    # device, where alpha 0 with CPU assist is bit-exact
    cpu_assist_int4: bool | None = None

    def int4_assist_on(self, device_type: str) -> bool:
        """Whether CPU assist uses torch's int4 kernel on a ``device_type`` device ("cuda",
        "cpu"; see ``cpu_assist_int4``)."""
        if self.cpu_assist_int4 is not None:
            return self.cpu_assist_int4
        return device_type == "cuda"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("experts", self.experts, EXPERTS_IMPLEMENTATIONS)
        _check_choice("expert quantization", self.expert_quant, EXPERT_QUANTS)
        if self.context_length < 16:
            raise ValueError(f"context length must be at least 16; got {self.context_length}")

    def with_live(self, live: LiveOptions) -> LoadConfig:
        return replace(self, live=live)


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are picked. ``greedy`` ignores temperature, top-p and top-k."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_finite(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 disables it); got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be positive; got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be at least 1; got {self.max_new_tokens}")


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: either chat ``messages`` (template applied) or a raw ``prompt``."""

    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    chat_template: str | None = None  # overrides the tokenizer's template when set
    live: LiveOptions | None = None  # policy/alpha for this request only (then restored)

    def __post_init__(self) -> None:
        if self.prompt is None and not self.messages:
            raise ValueError("a request needs a prompt or chat messages")
        if self.prompt is not None and self.messages:
            raise ValueError("give a prompt or chat messages, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("the prompt is empty")
        if self.messages and not any(m.content.strip() for m in self.messages if m.role == "user"):
            raise ValueError("the conversation has no user message with text")
