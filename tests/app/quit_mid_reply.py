"""Run the app (``python -m app --demo``), send a message and quit while the reply streams.

Used by ``test_quit_mid_reply`` in a child process: ``python tests/app/quit_mid_reply.py
SECONDS [sigterm]`` (``sigterm``: the process is sent SIGTERM instead of closing the window).
It replaces the smoke test's ready handler; the rest is the app's own start and exit path.
"""

from __future__ import annotations

import os
import signal
import sys

from PySide6.QtCore import QTimer

import app.__main__ as entry
from app.main_window import MainWindow


class QuitMidReply:
    """At ready: send, then close the window ``delay_s`` later (as Ctrl+Q does)."""

    def __init__(self, window: MainWindow, require_model: bool, timeout_s: float) -> None:
        self.code = 0
        self.window = window
        window.ready.connect(self.ready)
        QTimer.singleShot(int(timeout_s * 1000), window.close)

    def ready(self, status: str) -> None:
        self.window.controller.send("Tell me about expert offloading")
        QTimer.singleShot(int(float(sys.argv[1]) * 1000), self.quit)

    def quit(self) -> None:
        print(f"QUIT generating={self.window.controller.generating}", flush=True)
        if sys.argv[2:] == ["sigterm"]:
            os.kill(os.getpid(), signal.SIGTERM)  # as logging out or ``kill`` does
        else:
            self.window.close()


if __name__ == "__main__":
    entry.SmokeTest = QuitMidReply  # type: ignore[misc, assignment]
    sys.exit(entry.main(["--demo", "--smoke-test", "--timeout", "60"]))
