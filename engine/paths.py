"""Where things live on disk: the built-in model and the per-user directories.

The built-in model ships in ``resources/models/`` (inside the source tree, or inside the
PyInstaller bundle). User data (chats, settings, added models) lives in the platformdirs
locations so it survives upgrades and uninstall.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "Understudy"
BUILTIN_MODEL_NAME = "understudy-mini-moe"


def resources_dir() -> Path:
    """The ``resources/`` folder: next to the packages, or inside a frozen bundle."""
    override = os.environ.get("UNDERSTUDY_RESOURCES")
    if override:
        return Path(override)
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def builtin_model_dir() -> Path:
    """The model used when no other is chosen."""
    override = os.environ.get("UNDERSTUDY_BUILTIN_MODEL")
    if override:
        return Path(override)
    return resources_dir() / "models" / BUILTIN_MODEL_NAME


def user_data_dir() -> Path:
    """Chats database, added models, benchmark curves. ``UNDERSTUDY_DATA_DIR`` overrides."""
    override = os.environ.get("UNDERSTUDY_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME, False))


def user_config_dir() -> Path:
    """Settings files. ``UNDERSTUDY_CONFIG_DIR`` overrides (tests point it at a temp dir)."""
    override = os.environ.get("UNDERSTUDY_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir(APP_NAME, False))
