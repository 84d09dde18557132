"""PySide6 6.12.0's ``emit`` drops a reference to ``True`` per call; on Python 3.11 a long
chat (a few thousand streamed tokens, each an emit) then aborted the interpreter. ``import app``
repairs it (``app.qt_fixes``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PySide6.QtCore import QObject, Signal

import app  # noqa: F401  (applies the repair)
from app.qt_fixes import emit_steals_reference, repair_signal_emit

ROOT = Path(__file__).resolve().parents[2]


class Emitter(QObject):
    fired = Signal()
    carried = Signal(object)


def test_emits_keep_the_reference_count_of_true() -> None:
    emitter = Emitter()
    emitter.carried.connect(lambda _value: None)
    emitter.fired.emit()  # warm-up: a first emit may cache objects of its own
    emitter.carried.emit(-1)
    before = sys.getrefcount(True)
    for index in range(5000):
        emitter.fired.emit()
        emitter.carried.emit(index)
    lost = before - sys.getrefcount(True)
    assert lost < 100, f"10000 emits took {lost} references to True (one per emit: the bug)"
    assert not emit_steals_reference(), "after the repair, emit no longer drops a reference"
    assert repair_signal_emit() is False, "repairing twice wraps nothing again"


def test_twenty_thousand_emits_in_a_fresh_interpreter_exit_cleanly() -> None:
    """Without the repair this process aborts (bool_dealloc) on an affected binding."""
    script = (
        "import app\n"
        "from PySide6.QtCore import QObject, Signal\n"
        "class E(QObject):\n"
        "    fired = Signal()\n"
        "e = E()\n"
        "for _ in range(20000):\n"
        "    e.fired.emit()\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]
