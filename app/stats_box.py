"""The latest ``StatsSnapshot`` of an app-side engine (demo or remote), behind a lock.

The engine's own thread writes it; the panel reads it from the UI thread. (The real engine
keeps its own, ``engine.runtime.engine.StatsBox``, which the app cannot import: torch.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from engine.events import StatsSnapshot


class StatsBox:
    """``get`` from any thread; ``put`` or ``change`` from the engine's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = StatsSnapshot()

    def get(self) -> StatsSnapshot:
        with self._lock:
            return self._snapshot

    def put(self, snapshot: StatsSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def change(self, how: Callable[[StatsSnapshot], StatsSnapshot]) -> None:
        """Replace the snapshot by ``how(snapshot)`` in one step (no update is lost)."""
        with self._lock:
            self._snapshot = how(self._snapshot)
