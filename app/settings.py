"""User preferences: per-model settings, app-wide prefs, and their mapping to engine config.

Everything is a frozen dataclass saved as JSON under ``engine.paths.user_config_dir()``.
Writes are atomic (temp file + ``os.replace``): a full disk leaves the old file intact and
raises ``SettingsSaveError`` with a message for the user. A corrupt file is moved aside (never
deleted) and defaults are used, with a message saying so. No Qt in here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.atomic import write_text_atomic
from engine.config import LiveOptions, LoadConfig, SamplingConfig
from engine.errors import InvalidRequestError
from engine.options import (
    EngineOptions,
    build_live_options,
    build_load_config,
    build_sampling,
    curve_default_alpha,
)

THEMES: tuple[str, ...] = ("system", "light", "dark")
RELOAD_FIELDS: frozenset[str] = frozenset(
    {"device", "cache_budget_gb", "context_length", "expert_quant", "mmap_experts"}
)
LIVE_FIELDS: frozenset[str] = frozenset({"policy", "alpha", "prefetch", "cpu_assist"})
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class SettingsError(Exception):
    """Base of the settings errors shown to the user."""


class SettingsSaveError(SettingsError):
    """A settings file could not be written; the previous file is unchanged."""


@dataclass(frozen=True)
class ModelSettings:
    """What a user chooses for one model. Validated by building the engine configs."""

    device: str = "auto"
    cache_budget_gb: float | None = None  # None: the engine's default share of the experts
    policy: str = "smoe"
    alpha: float = 0.0
    prefetch: bool = True
    cpu_assist: bool = True
    context_length: int = 2048
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    chat_template: str | None = None  # None: the tokenizer's own template
    expert_quant: str = "none"  # "int8"/"int4": quantize a safetensors model's experts at load
    mmap_experts: bool = False  # experts read from the mapped file (model or quantized cache)

    def __post_init__(self) -> None:
        try:
            to_load_config(Path("."), self)
            to_sampling(self)
        except InvalidRequestError as error:
            raise ValueError(str(error)) from error

    def changed_fields(self, other: ModelSettings) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def needs_reload(self, other: ModelSettings) -> bool:
        return bool(self.changed_fields(other) & RELOAD_FIELDS)


@dataclass(frozen=True)
class AppPrefs:
    """App-wide preferences."""

    theme: str = "system"
    font_size: int = 11
    last_model: str | None = None
    model_folders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.theme not in THEMES:
            raise ValueError(f"theme must be one of {', '.join(THEMES)}; got {self.theme!r}")
        if not 6 <= self.font_size <= 40:
            raise ValueError(f"font size must be between 6 and 40; got {self.font_size}")
        object.__setattr__(self, "model_folders", tuple(self.model_folders))


@dataclass(frozen=True)
class LastWorking:
    """The last model and settings that loaded successfully (offered after a crash)."""

    model_dir: str
    settings: ModelSettings


def engine_options(model_dir: Path, settings: ModelSettings, force: bool = False) -> EngineOptions:
    """The user's choices in the engine's own options type (``engine.options``)."""
    return EngineOptions(
        model_dir=model_dir,
        device=settings.device,
        cache_gb=settings.cache_budget_gb,
        context_length=settings.context_length,
        force=force,
        policy=settings.policy,
        alpha=settings.alpha,
        prefetch=settings.prefetch,
        cpu_assist=settings.cpu_assist,
        expert_quant=settings.expert_quant,
        mmap_experts=settings.mmap_experts,
    )


def to_live_options(settings: ModelSettings) -> LiveOptions:
    return build_live_options(engine_options(Path("."), settings))


def to_sampling(settings: ModelSettings) -> SamplingConfig:
    return build_sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        repetition_penalty=settings.repetition_penalty,
        max_new_tokens=settings.max_new_tokens,
    )


def to_load_config(model_dir: Path, settings: ModelSettings, force: bool = False) -> LoadConfig:
    """User preferences as a ``LoadConfig``, via ``engine.options.build_load_config``.

    Raises ``ModelLoadError`` when the folder is missing, ``InvalidRequestError`` when a
    choice is invalid.
    """
    return build_load_config(engine_options(model_dir, settings, force))


def _from_dict(cls: Any, data: Any) -> Any:
    """Build a settings dataclass from JSON data; unknown keys are ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    values = {key: value for key, value in data.items() if key in known}
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(str(error)) from error


def model_settings_from_dict(data: Any) -> ModelSettings:
    settings = _from_dict(ModelSettings, data)
    _check_types(settings)
    return settings


def _check_types(settings: ModelSettings) -> None:
    for name in ("prefetch", "cpu_assist"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"{name} must be true or false")
    for name in ("context_length", "top_k", "max_new_tokens"):
        if not isinstance(getattr(settings, name), int):
            raise ValueError(f"{name} must be a whole number")


def model_key(model_dir: Path | str) -> str:
    """A file-name-safe key per model folder: readable name plus a hash of the full path."""
    path = str(Path(model_dir).expanduser().resolve())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name)[:60] or "model"
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file and ``os.replace``; on failure the old file is intact."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as error:  # NaN or infinity: never written as non-standard JSON
        raise SettingsSaveError(f"Could not save settings to {path}: {error}") from error
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise SettingsSaveError(_save_message(path, error)) from error


def _save_message(path: Path, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the folder is not writable"
    else:
        reason = error.strerror or str(error)
    return (
        f"Could not save settings to {path}: {reason}. "
        "Your previous settings are unchanged; free some space or check permissions and try again."
    )


def move_aside(path: Path) -> Path:
    """Rename a bad file next to itself with a ``.corrupt-<time>`` suffix; return the new path."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{target.name}-{counter}")
        counter += 1
    os.replace(path, target)
    return target


def default_model_settings(model_dir: Path) -> ModelSettings:
    """Defaults for a model never configured: alpha from its measured curve when there is one.

    The benchmark picks that alpha from the model's speed/fidelity curve; without a curve (or
    with an unusable one) the model starts exact, at alpha 0.
    """
    alpha = curve_default_alpha(model_dir)  # the engine's rule, shared with the CLI
    return ModelSettings() if alpha is None else ModelSettings(alpha=alpha)


class SettingsStore:
    """Reads and writes the settings files. ``warnings`` collects messages for the user."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.warnings: list[str] = []

    def _model_path(self, model_dir: Path | str) -> Path:
        return self.config_dir / "models" / f"{model_key(model_dir)}.json"

    def _read(self, path: Path, parse: Any, default: Any) -> Any:
        if not path.exists():
            return default
        try:
            return parse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            aside = move_aside(path)
            self.warnings.append(
                f"The settings file {path.name} was unreadable ({error}); defaults are used. "
                f"The bad file was kept as {aside}."
            )
            return default

    def load_model(self, model_dir: Path | str) -> ModelSettings:
        default = default_model_settings(Path(model_dir))
        return self._read(self._model_path(model_dir), model_settings_from_dict, default)

    def save_model(self, model_dir: Path | str, settings: ModelSettings) -> None:
        write_json_atomic(self._model_path(model_dir), asdict(settings))

    def load_prefs(self) -> AppPrefs:
        return self._read(self.config_dir / "prefs.json", _prefs_from_dict, AppPrefs())

    def save_prefs(self, prefs: AppPrefs) -> None:
        write_json_atomic(self.config_dir / "prefs.json", asdict(prefs))

    def load_last_working(self) -> LastWorking | None:
        return self._read(self.config_dir / "last_working.json", _last_working_from_dict, None)

    def save_last_working(self, model_dir: Path | str, settings: ModelSettings) -> None:
        data = {"model_dir": str(model_dir), "settings": asdict(settings)}
        write_json_atomic(self.config_dir / "last_working.json", data)

    def remember_model(self, model_dir: Path | str) -> AppPrefs:
        prefs = self.load_prefs()
        folders = prefs.model_folders
        if str(model_dir) not in folders:
            folders = (*folders, str(model_dir))
        prefs = replace(prefs, last_model=str(model_dir), model_folders=folders)
        self.save_prefs(prefs)
        return prefs


def _prefs_from_dict(data: Any) -> AppPrefs:
    prefs = _from_dict(AppPrefs, data)
    if not isinstance(prefs.font_size, int):
        raise ValueError("font_size must be a whole number")
    return prefs


def _last_working_from_dict(data: Any) -> LastWorking:
    if not isinstance(data, dict) or not isinstance(data.get("model_dir"), str):
        raise ValueError("last working settings need a model folder")
    return LastWorking(data["model_dir"], model_settings_from_dict(data.get("settings")))
