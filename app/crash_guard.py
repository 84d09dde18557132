"""Detects that the previous run did not close cleanly, via a 'running' marker file.

``start()`` reports whether a marker was left behind (a crash or a kill), then writes a fresh
one; ``stop()`` removes it on a clean exit. No Qt in here.
"""

from __future__ import annotations

import os
from pathlib import Path


class CrashGuard:
    def __init__(self, config_dir: Path) -> None:
        self.marker = config_dir / "running"

    def start(self) -> bool:
        """Write the marker; return True when the previous run left one behind."""
        crashed = self.marker.exists()
        try:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(os.getpid()), encoding="utf-8")
        except OSError:
            pass  # without a marker we only lose the crash offer next time
        return crashed

    def stop(self) -> None:
        self.marker.unlink(missing_ok=True)
