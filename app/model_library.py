"""Finding models: folders added by hand, the app's models folder, the Hugging Face cache, and
GGUF files in those places and in LM Studio's models folders.

Models are used where they are (never copied): a Hugging Face cache entry is its snapshot
folder, whose files are symlinks into ``blobs/``; a GGUF entry is the file itself (the first
part of a split set, sized with all its parts). Details such as experts and top-k come from
``EngineAPI.inspect``; this module only finds models, sizes them and, for GGUF files, reads the
header summary (architecture, quant type, MoE or dense) with ``engine.gguf.header``, which
needs no torch. No Qt here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.gguf.header import summarize
from engine.paths import (
    BUILTIN_MODEL_NAME,
    builtin_model_dir,
    fallback_model_dir,
    looks_assembled,
    user_data_dir,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    name: str
    source: str  # "built-in", "added", "models folder", "Hugging Face cache"
    size_bytes: int
    architecture: str  # from config.json (or the GGUF header), "" when unknown
    quant: str = ""  # GGUF file type such as "Q4_K_M"; "" for safetensors folders
    moe: bool | None = None  # False: a dense GGUF, which the engine refuses; None: not known yet
    problem: str = ""  # why a GGUF file could not be read


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


def startup_model(
    last_model: str | None, remotes_dir: Path | None = None
) -> tuple[Path, str | None]:
    """The model to load at start and, when the last-used one is gone, the notice to show.

    A last-used model whose folder (or GGUF file) no longer exists falls back to the built-in
    model (the small fallback when the built-in one is not assembled): the app never starts
    with nothing loaded while a working model is there. A remote engine's entry under
    ``remotes_dir`` is no folder on disk; the remote actions resume it.
    """
    if not last_model:
        return builtin_model_dir(), None
    last = Path(last_model)
    if last.exists() or (remotes_dir is not None and last.parent == remotes_dir):
        return last, None
    builtin = builtin_model_dir()
    return builtin, f"The last model was not found at {last}; loaded {builtin.name} instead."


def lmstudio_models_dirs() -> list[Path]:
    """LM Studio's models folders: ``~/.lmstudio/models`` and the older ``~/.cache/lm-studio``."""
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def _split_parts(path: Path) -> list[Path]:
    match = SPLIT_GGUF.match(path.name)
    if match is None:
        return [path]
    return sorted(path.parent.glob(f"{glob.escape(match['stem'])}-*-of-{match['count']}.gguf"))


def is_gguf_model(path: Path) -> bool:
    """A ``.gguf`` file that is a model: not a split part after the first, not a projector."""
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return False
    match = SPLIT_GGUF.match(path.name)
    return (match is None or match["part"] == "00001") and not path.name.startswith("mmproj")


def gguf_name(path: Path) -> str:
    """A GGUF model's name: the file's stem; a split set's without its part numbers."""
    match = SPLIT_GGUF.match(path.name)
    return path.stem if match is None else f"{match['stem']} ({int(match['count'])} parts)"


def gguf_entry(path: Path, source: str, name: str | None = None) -> ModelEntry:
    """A GGUF file's entry from its header: quant type, MoE or dense, every part's size."""
    summary = summarize(path)
    size = sum(p.stat().st_size for p in _split_parts(path) if p.is_file())
    return ModelEntry(
        path, name or gguf_name(path), source, size, summary.architecture, summary.file_type,
        None if summary.problem else summary.is_moe, summary.problem,
    )  # fmt: skip


def scan_gguf_files(folder: Path, source: str, depth: int = 3) -> list[ModelEntry]:
    """GGUF models in ``folder`` and up to ``depth`` levels below (LM Studio: publisher/repo)."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    level = [folder]
    for _ in range(depth + 1):
        found += [p for d in level for p in d.glob("*.gguf") if is_gguf_model(p)]
        level = [p for d in level for p in d.iterdir() if p.is_dir() and not p.is_symlink()]
    return [gguf_entry(p, source) for p in sorted(found)]


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


def _gguf_snapshot(repo_dir: Path) -> Path | None:
    """The newest snapshot of a cache repo that holds GGUF files (GGUF repos have no config)."""
    snapshots = repo_dir / "snapshots"
    found = [p for p in snapshots.glob("*") if any(p.glob("*.gguf"))] if snapshots.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def scan_hf_cache(cache: Path | None = None) -> list[ModelEntry]:
    """Model repos in the Hugging Face cache (``models--org--name`` folders), GGUF repos too."""
    cache = cache or hf_cache_dir()
    entries = []
    for repo_dir in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        name = repo_dir.name.removeprefix("models--").replace("--", "/")
        snapshot = hf_snapshot(repo_dir)
        if snapshot is not None:
            entries.append(entry_for(snapshot, "Hugging Face cache", name))
        elif (gguf := _gguf_snapshot(repo_dir)) is not None:
            for entry in scan_gguf_files(gguf, "Hugging Face cache", depth=1):
                entries.append(dataclasses.replace(entry, name=f"{name}/{entry.path.name}"))
    return entries


def scan_models_folder(folder: Path | None = None) -> list[ModelEntry]:
    folder = folder or app_models_dir()
    found = sorted(p for p in folder.iterdir() if _listable(p)) if folder.is_dir() else []
    return [entry_for(p, "models folder") for p in found] + scan_gguf_files(folder, "models folder")


def scan_lmstudio(folders: list[Path] | None = None) -> list[ModelEntry]:
    """GGUF models in LM Studio's folders (``publisher/repo/file.gguf``)."""
    entries: list[ModelEntry] = []
    for folder in lmstudio_models_dirs() if folders is None else folders:
        entries += scan_gguf_files(folder, "LM Studio")
    return entries


def _listable(path: Path) -> bool:
    """A model folder, but not a half-written (hidden) or unfinished built-in assembly."""
    if path.name.startswith(".") or not is_model_dir(path):
        return False
    return path.name != BUILTIN_MODEL_NAME or looks_assembled(path)


def check_model_folder(path: Path) -> Path:
    """Validate a folder (or GGUF file) the user picked; ``ValueError`` with a clear message."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        summary = summarize(path)
        if summary.problem:
            raise ValueError(f"{path.name} cannot be read as GGUF: {summary.problem}")
        if not summary.is_moe:
            raise ValueError(f"{path.name} is a dense model (not MoE); Understudy runs MoE models")
        return path
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
    scanned = scan_models_folder() + scan_hf_cache(hf_cache) + scan_lmstudio()
    found = {entry.path.resolve() for entry in scanned}  # a loaded model is remembered as added:
    added = tuple(p for p in added if Path(p).resolve() not in found)  # list it where it is
    entries += [entry_for(Path(p), "added") for p in added if is_model_dir(Path(p))]
    entries += [gguf_entry(Path(p), "added") for p in added if is_gguf_model(Path(p))]
    entries += scanned
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
