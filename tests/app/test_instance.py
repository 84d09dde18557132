"""One app per profile: a second start finds the first, brings it forward and exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.instance import SingleInstance, already_running_message

HOLDER = """
import sys, time
from pathlib import Path
from PySide6.QtCore import QCoreApplication
from app.instance import SingleInstance
app = QCoreApplication([])
instance = SingleInstance(Path(sys.argv[1]))
assert instance.acquire()
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_process_on_the_same_profile_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not SingleInstance(tmp_path).acquire()
        assert SingleInstance(tmp_path / "other-profile").acquire()
    finally:
        holder.communicate("\n", timeout=30)
    assert SingleInstance(tmp_path).acquire(), "the lock of an app that ended is free again"


def test_the_second_start_brings_the_first_forward(qtbot: Any, tmp_path: Path) -> None:
    first = SingleInstance(tmp_path)
    assert first.acquire()
    calls: list[str] = []
    assert first.listen(lambda: calls.append("activate"))
    second = SingleInstance(tmp_path)
    assert not second.acquire()
    assert second.activate_first()
    qtbot.waitUntil(lambda: calls == ["activate"], timeout=3000)
    first.release()
    assert SingleInstance(tmp_path).acquire()


def test_the_message_names_the_profile_and_what_happened(tmp_path: Path) -> None:
    text = already_running_message(tmp_path, reached=True)
    assert "already running" in text and str(tmp_path) in text and "front" in text
    assert "close it" in already_running_message(tmp_path, reached=False)


def test_main_exits_with_a_message_when_the_profile_is_taken(
    qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from app.__main__ import EXIT_ALREADY_RUNNING, main

    first = SingleInstance(tmp_path / "data")  # the autouse fixture's data folder
    assert first.acquire()
    try:
        assert main(["--smoke-test"]) == EXIT_ALREADY_RUNNING
    finally:
        first.release()
    assert "already running" in capsys.readouterr().err


def test_the_lock_of_a_killed_app_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()  # a crash: the lock file stays behind
    holder.communicate(timeout=30)
    assert SingleInstance(tmp_path).acquire(), "a dead app's lock does not lock you out"
