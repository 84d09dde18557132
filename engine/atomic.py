"""Atomic file writes: a temp file in the same folder, flushed to disk, then ``os.replace``.

A kill or a full disk during a write leaves the previous file intact (never a 0-byte or
half-written one), because the rename is the only step that changes what the path names.
Every output the project writes (fidelity JSON, bench files, curves, settings) goes through
here. No torch, no Qt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_for(path: Path) -> Path:
    """A hidden sibling of ``path`` (same folder, so ``os.replace`` is a rename) keeping the
    suffix, so writers that pick a format by extension (matplotlib) still do."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_for(path)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``. Raises ``OSError``."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``. Raises ``OSError``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_with(path: Path, writer: Callable[[Path], object]) -> Path:
    """Let ``writer`` fill a temp file (e.g. ``figure.savefig``), then put it in place."""
    with atomic_path(path) as temp:
        writer(temp)
    return Path(path)
