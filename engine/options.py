"""User choices -> engine config, in one place for the CLI and the app.

``EngineOptions`` holds what a person picks (CLI flags, the app's settings) in plain values;
``build_load_config`` is the one function that turns them into a validated ``LoadConfig``
(and ``build_live_options`` the policy/alpha/method switches into ``LiveOptions``). Invalid
choices become ``InvalidRequestError`` with the config's own message. No torch here.

Defaults are the same everywhere: policy ``smoe`` at the alpha the model's benchmark curve
chose (``curve_default_alpha``; 0, exact, without a curve). ``unused_options`` names choices
that would do nothing (``--alpha`` with ``lru``), which the CLI refuses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from engine.config import (
    ALPHA_MAX,
    CacheConfig,
    ChatMessage,
    GenerateRequest,
    LiveOptions,
    LoadConfig,
    SamplingConfig,
)
from engine.errors import InvalidRequestError, ModelLoadError
from engine.paths import builtin_model_dir, user_data_dir

_SAMPLING_DEFAULTS = SamplingConfig()
DEFAULT_POLICY = "smoe"
CURVE_FILE = "understudy_curve.json"  # the shipped curve in a model's folder
MAX_CURVE_BYTES = 1 << 20  # a curve is a few KB; a bigger file is not read


@dataclass(frozen=True)
class EngineOptions:
    """What a user chose about model, device, cache and method; ``None`` means the default."""

    model_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_gb: float | None = None
    cache_fraction: float | None = None
    context_length: int = 2048
    force: bool = False
    policy: str = DEFAULT_POLICY
    alpha: float | None = None  # None: the model's curve alpha for smoe, else 0
    eviction: str | None = None
    substitution: bool = True
    prefetch: bool = True
    cpu_assist: bool = True
    prefetch_from: str = "attention"
    experts: str = "auto"
    expert_quant: str = "none"
    mmap_experts: bool = False
    cpu_assist_int4: str = "auto"  # CPU assist from torch's int4 kernel: auto (CUDA), on, off


def _invalid(error: ValueError) -> InvalidRequestError:
    message = str(error)
    return InvalidRequestError(message[:1].upper() + message[1:])


def resolve_model_dir(model_dir: Path | None) -> Path:
    """The chosen folder, or the built-in model; a clear error when it is not there."""
    if model_dir is None:
        path = builtin_model_dir()
        if not path.is_dir():
            raise ModelLoadError(
                f"The built-in model is not installed at {path} (it may not be built yet): "
                "pass a model folder with --model DIR."
            )
        return path
    path = Path(model_dir).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir():
        raise ModelLoadError(f"The model folder {path} does not exist.")
    return path


def curve_paths(model_dir: Path) -> tuple[Path, Path]:
    """Where a model's curve is read: the user's measured one, then the one it ships."""
    return user_data_dir() / "curves" / f"{model_dir.name}.json", model_dir / CURVE_FILE


def _curve_alpha(path: Path) -> float | None:
    try:
        if path.stat().st_size > MAX_CURVE_BYTES:
            return None
        value = json.loads(path.read_text(encoding="utf-8")).get("default_alpha")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0.0 <= value <= ALPHA_MAX else None


def curve_default_alpha(model_dir: Path) -> float | None:
    """The alpha the model's benchmark curve chose, or None (no curve, or an unusable one).

    The first curve file that exists decides (the user's own measurement wins over the
    shipped one); the app's defaults and the CLI's both come from here.
    """
    for path in curve_paths(Path(model_dir)):
        if path.is_file():
            return _curve_alpha(path)
    return None


def resolved_alpha(options: EngineOptions) -> float:
    """The alpha in force: the one given, else the curve's for ``smoe``, else 0."""
    if options.alpha is not None:
        return options.alpha
    if options.policy != "smoe":
        return 0.0
    return curve_default_alpha(resolve_model_dir(options.model_dir)) or 0.0


def unused_options(options: EngineOptions) -> list[str]:
    """Choices given explicitly that would change nothing, as messages (empty: all used)."""
    problems = []
    if options.policy != "smoe":
        given = [f"--alpha {options.alpha:g}"] if options.alpha is not None else []
        given += [
            f"--no-{name.replace('_', '-')}"
            for name in ("substitution", "prefetch", "cpu_assist")
            if not getattr(options, name)
        ]
        if options.prefetch_from != "attention":
            given.append(f"--prefetch-from {options.prefetch_from}")
        problems += [
            f"{flag} does nothing with --policy {options.policy} (only smoe substitutes, "
            "prefetches and computes on the CPU); drop it or use --policy smoe"
            for flag in given
        ]
    elif not options.substitution and options.alpha is not None:
        problems.append(
            f"--alpha {options.alpha:g} does nothing with --no-substitution (alpha is the "
            "substitution threshold); drop one of them"
        )
    return problems + _unused_int4(options)


def _unused_int4(options: EngineOptions) -> list[str]:
    """``--cpu-assist-int4 on`` where no CPU assist runs, or in a dtype its kernel is not for."""
    if options.cpu_assist_int4 != "on":
        return []
    if options.policy != "smoe" or not options.cpu_assist:
        return [
            "--cpu-assist-int4 on does nothing without CPU assist (--policy smoe, no "
            "--no-cpu-assist)"
        ]
    if options.dtype in ("float32", "float16"):
        return [
            f"--cpu-assist-int4 on does nothing with --dtype {options.dtype}: torch's int4 kernel "
            "is used in bfloat16 only (in float32 it is slower than a decoded expert)"
        ]
    return []


INT4_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def _int4_choice(choice: str) -> bool | None:
    if choice not in INT4_CHOICES:
        raise ValueError(f"--cpu-assist-int4 must be one of auto, on, off; got {choice!r}")
    return INT4_CHOICES[choice]


def build_live_options(options: EngineOptions) -> LiveOptions:
    """Policy, alpha, eviction and the three method switches as ``LiveOptions``."""
    try:
        return LiveOptions(
            policy=cast(Any, options.policy),
            alpha=resolved_alpha(options),
            eviction=cast(Any, options.eviction),
            substitution=options.substitution,
            prefetch=options.prefetch,
            cpu_assist=options.cpu_assist,
            prefetch_from=cast(Any, options.prefetch_from),
        )
    except ValueError as error:
        raise _invalid(error) from error


def build_load_config(options: EngineOptions) -> LoadConfig:
    """The one place user preferences become engine config."""
    model_dir = resolve_model_dir(options.model_dir)
    live = build_live_options(options)
    try:
        cache = CacheConfig(budget_gb=options.cache_gb, fraction=options.cache_fraction)
        return LoadConfig(
            model_dir=model_dir,
            device=cast(Any, options.device),
            dtype=cast(Any, options.dtype),
            context_length=options.context_length,
            cache=cache,
            live=live,
            force=options.force,
            experts=options.experts,
            expert_quant=cast(Any, options.expert_quant),
            mmap_experts=options.mmap_experts,
            cpu_assist_int4=_int4_choice(options.cpu_assist_int4),
        )
    except ValueError as error:
        raise _invalid(error) from error


def build_sampling(
    greedy: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> SamplingConfig:
    """Sampling choices; greedy means the pure arg-max (no repetition penalty unless given)."""
    d = _SAMPLING_DEFAULTS
    if greedy and repetition_penalty is None:
        repetition_penalty = 1.0
    try:
        return SamplingConfig(
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            top_k=d.top_k if top_k is None else top_k,
            repetition_penalty=d.repetition_penalty
            if repetition_penalty is None
            else repetition_penalty,
            max_new_tokens=d.max_new_tokens if max_new_tokens is None else max_new_tokens,
            stop=tuple(stop),
            greedy=greedy,
            seed=seed,
        )
    except ValueError as error:
        raise _invalid(error) from error


def build_request(
    text: str,
    sampling: SamplingConfig,
    chat: bool = False,
    system: str | None = None,
    chat_template: str | None = None,
) -> GenerateRequest:
    """A raw-prompt request, or (``chat``) a one-turn chat with an optional system message."""
    try:
        if not chat:
            if system is not None:
                raise ValueError("a system message needs chat mode")
            return GenerateRequest(prompt=text, sampling=sampling, chat_template=chat_template)
        messages: tuple[ChatMessage, ...] = (ChatMessage("system", system),) if system else ()
        messages += (ChatMessage("user", text),)
        return GenerateRequest(messages=messages, sampling=sampling, chat_template=chat_template)
    except ValueError as error:
        raise _invalid(error) from error
