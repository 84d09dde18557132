"""Where things live on disk: the built-in model and the per-user directories.

The built-in model is an MoE re-cut from SmolLM2-135M-Instruct. Its recipe's learned parts
ship in ``resources/models/understudy-smollm2-moe`` (inside the source tree, or inside the
PyInstaller bundle); the checkpoint is assembled from them on first run into the user data
folder (``python -m engine.training.moefy assemble``), or bundled already assembled by the
installers. Until it is assembled, the small model trained from scratch
(``resources/models/understudy-mini-moe``) stands in. User data (chats, settings, added
models) lives in the platformdirs locations so it survives upgrades and uninstall.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "Understudy"
BUILTIN_MODEL_NAME = "understudy-smollm2-moe"
FALLBACK_MODEL_NAME = "understudy-mini-moe"
ASSEMBLED_STAMP = "assembled.json"
ASSEMBLE_COMMAND = "python -m engine.training.moefy assemble"


def resources_dir() -> Path:
    """The ``resources/`` folder: next to the packages, or inside a frozen bundle."""
    override = os.environ.get("UNDERSTUDY_RESOURCES")
    if override:
        return Path(override)
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def builtin_recipe_dir() -> Path:
    """The built-in model's shipped folder: the recipe's learned parts and card (or, in an
    installer bundle, the assembled model itself)."""
    return resources_dir() / "models" / BUILTIN_MODEL_NAME


def assembled_model_dir() -> Path:
    """Where the first run assembles the built-in model."""
    return user_data_dir() / "models" / BUILTIN_MODEL_NAME


def fallback_model_dir() -> Path:
    """The small model used while the built-in one is not assembled."""
    return resources_dir() / "models" / FALLBACK_MODEL_NAME


def looks_assembled(folder: Path) -> bool:
    """Cheap check (no hashing): the stamp exists and every file it lists has its size.

    The assembly step checks hashes; this keeps a partial or truncated folder from loading.
    """
    try:
        files = json.loads((folder / ASSEMBLED_STAMP).read_text())["files"]
        return all((folder / n).stat().st_size == meta["size"] for n, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def builtin_model_dir() -> Path:
    """The model used when no other is chosen: the assembled MoE, else the small fallback."""
    override = os.environ.get("UNDERSTUDY_BUILTIN_MODEL")
    if override:
        return Path(override)
    for folder in (builtin_recipe_dir(), assembled_model_dir()):
        if looks_assembled(folder):
            return folder
    return fallback_model_dir()


def builtin_notice() -> str | None:
    """What to tell the user when the built-in model stands in for the assembled one."""
    if os.environ.get("UNDERSTUDY_BUILTIN_MODEL") or builtin_model_dir() != fallback_model_dir():
        return None
    return (
        "The built-in SmolLM2 MoE is not assembled yet (it needs the network once); using the "
        f"small test model. To assemble it: .venv/bin/{ASSEMBLE_COMMAND}"
    )


def user_data_dir() -> Path:
    """Chats database, added models, benchmark curves. ``UNDERSTUDY_DATA_DIR`` overrides."""
    override = os.environ.get("UNDERSTUDY_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME, False))


def user_config_dir() -> Path:
    """Settings files. ``UNDERSTUDY_CONFIG_DIR`` overrides (tests point it at a temp dir)."""
    override = os.environ.get("UNDERSTUDY_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir(APP_NAME, False))
