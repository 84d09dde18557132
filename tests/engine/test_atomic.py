"""Atomic writes: a kill or an error during a write leaves the previous file intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.atomic import write_text_atomic, write_with

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from engine.atomic import atomic_path
with atomic_path(Path(sys.argv[1])) as temp:
    with open(temp, "w") as handle:
        handle.write("half a new fi")
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_during_a_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "curve.json"
    target.write_text('{"old": true}\n', encoding="utf-8")
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], check=False)
    assert run.returncode != 0  # killed
    assert target.read_text(encoding="utf-8") == '{"old": true}\n'


def test_an_error_during_a_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def broken(temp: Path) -> None:
        temp.write_bytes(b"par")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_write_replaces_the_file_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.md"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text(encoding="utf-8") == "two"
    assert [p.name for p in target.parent.iterdir()] == ["b.md"]
