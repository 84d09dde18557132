"""Understudy desktop app: a PySide6 + qasync chat window over the engine's public API.

The app never imports torch: it talks to ``engine.protocol.EngineAPI`` only, and builds the
real engine lazily in ``app.bridge``.
"""

__version__ = "0.1.0"

from app.qt_fixes import repair_signal_emit

repair_signal_emit()  # before any signal is emitted (see app.qt_fixes)
