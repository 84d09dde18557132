"""Finding model folders: added by hand, the app's models folder, the Hugging Face cache.

Models are used where they are (never copied): a Hugging Face cache entry is its snapshot
folder, whose files are symlinks into ``blobs/``. Details such as architecture and experts
come from ``EngineAPI.inspect``; this module only finds folders and sizes them. No Qt here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.paths import (
    BUILTIN_MODEL_NAME,
    builtin_model_dir,
    fallback_model_dir,
    looks_assembled,
    user_data_dir,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    name: str
    source: str  # "built-in", "added", "models folder", "Hugging Face cache"
    size_bytes: int
    architecture: str  # from config.json, "" when unknown


def hf_cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def app_models_dir() -> Path:
    return user_data_dir() / "models"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def folder_size(path: Path) -> int:
    """Bytes of the files in a folder, following symlinks (HF snapshots link to blobs)."""
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            continue
    return total


def read_architecture(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    return str(config.get("model_type", "")) if isinstance(config, dict) else ""


def entry_for(path: Path, source: str, name: str | None = None) -> ModelEntry:
    return ModelEntry(path, name or path.name, source, folder_size(path), read_architecture(path))


def hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot a cache repo's ``refs/main`` points at, else the newest with a config."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text(encoding="utf-8").strip()
        if is_model_dir(candidate):
            return candidate
    found = [p for p in snapshots.glob("*") if is_model_dir(p)] if snapshots.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def scan_hf_cache(cache: Path | None = None) -> list[ModelEntry]:
    """Model repos in the Hugging Face cache (``models--org--name`` folders)."""
    cache = cache or hf_cache_dir()
    entries = []
    for repo_dir in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        snapshot = hf_snapshot(repo_dir)
        if snapshot is not None:
            name = repo_dir.name.removeprefix("models--").replace("--", "/")
            entries.append(entry_for(snapshot, "Hugging Face cache", name))
    return entries


def scan_models_folder(folder: Path | None = None) -> list[ModelEntry]:
    folder = folder or app_models_dir()
    found = sorted(p for p in folder.iterdir() if _listable(p)) if folder.is_dir() else []
    return [entry_for(p, "models folder") for p in found]


def _listable(path: Path) -> bool:
    """A model folder, but not a half-written (hidden) or unfinished built-in assembly."""
    if path.name.startswith(".") or not is_model_dir(path):
        return False
    return path.name != BUILTIN_MODEL_NAME or looks_assembled(path)


def check_model_folder(path: Path) -> Path:
    """Validate a folder the user picked; raise ``ValueError`` with a clear message."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    if not is_model_dir(path):
        raise ValueError(f"{path} has no config.json; pick the folder that holds the model files")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ValueError(f"{path} has a config.json but no weight files (.safetensors)")
    return path


def all_models(added: tuple[str, ...] = (), hf_cache: Path | None = None) -> list[ModelEntry]:
    """Built-in, added, models-folder and HF-cache models, without duplicates."""
    entries: list[ModelEntry] = []
    builtin = builtin_model_dir()
    if is_model_dir(builtin):
        entries.append(entry_for(builtin, "built-in"))
    if looks_assembled(builtin) and is_model_dir(fallback_model_dir()):
        entries.append(entry_for(fallback_model_dir(), "built-in (small)"))
    entries += [entry_for(Path(p), "added") for p in added if is_model_dir(Path(p))]
    entries += scan_models_folder() + scan_hf_cache(hf_cache)
    seen: set[Path] = set()
    unique = []
    for entry in entries:
        key = entry.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def human_bytes(count: float | None) -> str:
    if count is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
