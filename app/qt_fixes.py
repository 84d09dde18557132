"""Work-arounds for bugs in the pinned Qt bindings, applied once when ``app`` is imported.

PySide6 6.12.0's ``SignalInstance.emit`` returns ``True`` without taking a reference to it, so
every ``signal.emit(...)`` made from Python (the app's own signals, and qasync's
``call_soon_threadsafe``, once per engine event) leaves ``True`` one reference short. On
Python 3.11, where ``True`` is not immortal, its count reaches zero after a few thousand emits
and the interpreter aborts ("bool_dealloc: deallocating True or False"): mid-chat after some
thousands of streamed tokens, or at exit. ``repair_signal_emit`` checks for the bug with one
emit and, only where it is present, wraps ``emit`` to give back the missing reference. A
binding without the bug is left alone.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from PySide6.QtCore import QObject, Signal, SignalInstance


class _Probe(QObject):
    fired = Signal()


def _give_back(result: object) -> None:
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(result))


def emit_steals_reference() -> bool:
    """True when one ``emit`` leaves the object it returns one reference short."""
    probe = _Probe()
    before = sys.getrefcount(True)
    result = probe.fired.emit()  # type: ignore[func-returns-value]  # (stubs say None)
    del result
    short = sys.getrefcount(True) < before
    if short:
        _give_back(True)  # the probe's own emit
    return short


def repair_signal_emit() -> bool:
    """Wrap ``SignalInstance.emit`` where the binding drops a reference; True if wrapped."""
    original = SignalInstance.emit
    if getattr(original, "repaired", False) or not emit_steals_reference():
        return False

    def emit(self: SignalInstance, *args: Any) -> Any:
        result = original(self, *args)
        _give_back(result)
        return result

    emit.repaired = True  # type: ignore[attr-defined]
    SignalInstance.emit = emit  # type: ignore[method-assign]
    return True
