"""QApplication and qasync loop setup, theme (light/dark/system) and font size."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

import qasync
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFont, QIcon, QPalette
from PySide6.QtWidgets import QApplication, QWidget

from app import markdown_render
from app.markdown_render import Palette
from engine.paths import resources_dir

APP_ID = "understudy"

DARK_COLORS = {
    QPalette.ColorRole.Window: "#26292e",
    QPalette.ColorRole.WindowText: "#e6e6e6",
    QPalette.ColorRole.Base: "#1c1f23",
    QPalette.ColorRole.AlternateBase: "#2b2f35",
    QPalette.ColorRole.ToolTipBase: "#2b2f35",
    QPalette.ColorRole.ToolTipText: "#e6e6e6",
    QPalette.ColorRole.Text: "#e6e6e6",
    QPalette.ColorRole.Button: "#30343a",
    QPalette.ColorRole.ButtonText: "#e6e6e6",
    QPalette.ColorRole.BrightText: "#ff6b6b",
    QPalette.ColorRole.Link: "#6cb6ff",
    QPalette.ColorRole.Highlight: "#3d6fb4",
    QPalette.ColorRole.HighlightedText: "#ffffff",
    QPalette.ColorRole.PlaceholderText: "#8a8f98",
}


def create_application(argv: Sequence[str] | None = None) -> QApplication:
    existing = QApplication.instance()
    if isinstance(existing, QApplication):
        return existing
    app = QApplication(qt_arguments(argv if argv is not None else sys.argv))
    app.setApplicationName("Understudy")
    app.setOrganizationName("Understudy")
    app.setDesktopFileName(APP_ID)  # matches the installed .desktop file (Wayland icon)
    app.setWindowIcon(app_icon())
    app.setStyle("Fusion")
    return app


def qt_arguments(argv: Sequence[str]) -> list[str]:
    """The arguments for Qt, with the program named ``understudy``.

    X11 takes the window class (what task bars and ``xprop WM_CLASS`` show) from the program
    name, which under ``python -m app`` would be ``__main__.py``.
    """
    return [APP_ID, *list(argv)[1:]]


def app_icon() -> QIcon:
    """The app icon at every size shipped in ``resources/icons/png``."""
    icon = QIcon()
    for png in sorted((resources_dir() / "icons" / "png").glob("*.png")):
        icon.addFile(str(png))
    return icon


def create_loop(app: QApplication) -> qasync.QEventLoop:
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    return loop


def close_on_terminate(window: QWidget) -> QTimer:
    """SIGTERM (logging out, shutting down, ``kill``) closes the window as Ctrl+Q does.

    Without it Python died at once: the partial reply was not marked and the next start asked
    the crash-recovery question. Python runs a signal handler only between bytecodes, and Qt's
    loop may run none for a while, so a quarter-second timer gives it the chance. Returns the
    timer (it lives as long as ``window``).
    """
    signal.signal(signal.SIGTERM, lambda _signum, _frame: QTimer.singleShot(0, window.close))
    ticker = QTimer(window)
    ticker.timeout.connect(_nothing)
    ticker.start(250)
    return ticker


def _nothing() -> None:
    return None


def finish_pending_tasks(loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0) -> int:
    """Cancel the tasks still pending after the window closed and let them unwind.

    Call after ``run_forever`` returned and before the loop closes (``asyncio.run`` does the
    same). A task left pending (a reply streaming when the user quit) would otherwise be
    garbage-collected after the loop and its Qt timer are gone: its clean-up then schedules on
    a deleted ``_SimpleTimer`` (a logged RuntimeError, or a crash at exit). Returns how many
    tasks were cancelled.
    """
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        unwound = asyncio.wait(pending, timeout=timeout_s)
        loop.run_until_complete(unwound)
    return len(pending)


def system_prefers_dark(app: QApplication) -> bool:
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def dark_palette() -> QPalette:
    palette = QPalette()
    for role, color in DARK_COLORS.items():
        palette.setColor(role, QColor(color))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#7d828a"))
    return palette


def apply_theme(app: QApplication, theme: str, font_size: int) -> Palette:
    """Set the palette and font; return the matching palette for rendered chat HTML."""
    dark = theme == "dark" or (theme == "system" and system_prefers_dark(app))
    app.setPalette(dark_palette() if dark else app.style().standardPalette())
    font = QFont(app.font())
    font.setPointSize(font_size)
    app.setFont(font)
    return markdown_render.DARK if dark else markdown_render.LIGHT
