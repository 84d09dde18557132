"""The About window: versions of the app, Qt, Python and the engine's stack, and the offline
stance. Engine versions come from package metadata, so torch is never imported here."""

from __future__ import annotations

import html

from PySide6 import __version__ as pyside_version
from PySide6.QtCore import qVersion
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QVBoxLayout, QWidget

from app import __version__
from app.bridge import engine_versions

OFFLINE_NOTE = (
    "Understudy makes no network connection: models are loaded from folders on this computer, "
    "chats and settings stay in your user folders."
)


def versions() -> dict[str, str]:
    found = {"Understudy app": __version__, "Qt": qVersion(), "PySide6": pyside_version}
    found.update(engine_versions())
    return found


class AboutDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About Understudy")
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>&nbsp;{html.escape(v)}</td></tr>"
            for k, v in versions().items()
        )
        self.label = QLabel(
            "<h3>Understudy</h3><p>Offline chat for Mixture-of-Experts models bigger than your "
            f"GPU.</p><table>{rows}</table><p>{OFFLINE_NOTE}</p>"
        )
        self.label.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        buttons.accepted.connect(self.accept)
        layout = QVBoxLayout(self)
        layout.addWidget(self.label)
        layout.addWidget(buttons)
