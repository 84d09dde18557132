"""Errors are shown in the app and written to a log file, never lost in a console.

``install`` sets a global ``sys.excepthook`` and the asyncio loop's exception handler: each
unexpected error is logged under ``<user_data_dir>/logs/understudy.log`` and shown in a
non-modal dialog that names the log file.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from PySide6.QtWidgets import QMessageBox, QWidget

from engine.paths import user_data_dir

log = logging.getLogger("understudy")


def log_path() -> Path:
    return user_data_dir() / "logs" / "understudy.log"


def setup_logging() -> Path:
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


class ErrorReporter:
    def __init__(self, parent: QWidget | None = None) -> None:
        self.parent = parent
        self.shown: list[str] = []
        self.dialog: QMessageBox | None = None

    def show(self, summary: str, details: str = "") -> None:
        self.shown.append(summary)
        box = QMessageBox(self.parent)
        box.setIcon(QMessageBox.Icon.Critical)
        box.setWindowTitle("Understudy: unexpected error")
        box.setText(summary)
        box.setInformativeText(f"Details were written to {log_path()}.")
        if details:
            box.setDetailedText(details)
        box.setModal(False)
        box.show()
        self.dialog = box

    def excepthook(
        self, kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        details = "".join(traceback.format_exception(kind, error, trace))
        log.error("unexpected error:\n%s", details)
        self.show(f"{kind.__name__}: {error}", details)

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, BaseException):
            self.excepthook(type(error), error, error.__traceback__)
        else:
            log.error("event loop error: %s", context.get("message"))
            self.show(str(context.get("message", "unknown error")))

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        sys.excepthook = self.excepthook
        loop.set_exception_handler(self.loop_handler)
