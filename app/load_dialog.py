"""The loading window: memory estimate, "Load anyway", progress bar with Cancel, and errors.

Non-modal: it follows a ``ModelLoader``'s signals and never blocks the event loop.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtGui import QHideEvent
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.loader import ModelLoader, describe_estimate, ram_is_short, shortfall_advice
from engine.events import MemoryEstimate, ModelInfo

ESTIMATING = "Estimating memory…"


class LoadDialog(QDialog):
    load_anyway = Signal()
    settings_requested = Signal()
    mmap_requested = Signal()  # at "does not fit in RAM": read the experts from the file
    declined = Signal()  # closed at "does not fit" without choosing Load anyway

    def __init__(self, loader: ModelLoader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Loading model")
        self.setMinimumWidth(520)
        self.loader = loader
        self.awaiting_choice = False
        self.title = QLabel()
        self.estimate_label = QLabel(ESTIMATING)
        self.estimate_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.anyway_button = QPushButton("Load anyway")
        self.mmap_button = QPushButton("Read experts from the file")
        self.settings_button = QPushButton("Settings…")
        self.cancel_button = QPushButton("Cancel")
        self._layout()
        self.anyway_button.clicked.connect(self.load_anyway)
        self.settings_button.clicked.connect(self.settings_requested)
        self.mmap_button.clicked.connect(self.mmap_requested)
        self.cancel_button.clicked.connect(self._cancel)
        loader.estimated.connect(self._estimated)
        loader.needs_confirmation.connect(self._needs_confirmation)
        loader.progressed.connect(self._progressed)
        loader.loaded.connect(self._loaded)
        loader.failed.connect(self._failed)
        loader.cancelled.connect(self._cancelled)

    def _layout(self) -> None:
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons_in_order = (
            self.settings_button,
            self.mmap_button,
            self.anyway_button,
            self.cancel_button,
        )
        for button in buttons_in_order:
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        for widget in (self.title, self.estimate_label, self.progress, self.status):
            layout.addWidget(widget)
        layout.addLayout(buttons)

    def begin(self, model_name: str) -> None:
        self.title.setText(f"<b>{model_name}</b>")
        self.estimate_label.setText(ESTIMATING)
        self.status.setText("")
        self.status.setStyleSheet("")
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.anyway_button.setVisible(False)
        self.mmap_button.setVisible(False)
        self.settings_button.setVisible(False)
        self.cancel_button.setText("Cancel")
        self.awaiting_choice = False
        self.show()

    def _estimated(self, estimate: MemoryEstimate) -> None:
        self.estimate_label.setText(describe_estimate(estimate))
        self._fit()

    def _fit(self) -> None:
        """Grow with the text: the estimate arrives after the window is shown (four lines
        where "Estimating memory…" was one) and was cut off at the top and the bottom."""
        layout = self.layout()
        needed = self.sizeHint().height()
        if layout is not None:
            layout.activate()
            width = max(self.width(), self.minimumSizeHint().width())
            needed = max(needed, layout.totalHeightForWidth(width))  # wrapped labels in full
        self.resize(max(self.width(), self.minimumSizeHint().width()), max(self.height(), needed))

    def _needs_confirmation(self, estimate: MemoryEstimate) -> None:
        self.progress.setVisible(False)
        self.status.setText(shortfall_advice(estimate))
        self.mmap_button.setVisible(ram_is_short(estimate))
        self.anyway_button.setVisible(True)
        self.settings_button.setVisible(True)
        self.cancel_button.setText("Close")
        self.awaiting_choice = True
        self._fit()

    def _progressed(self, fraction: float, message: str) -> None:
        self.progress.setValue(round(fraction * 1000))
        self.status.setText(message)

    def _loaded(self, info: ModelInfo) -> None:
        self.status.setText(f"Loaded {info.name}.")
        self.hide()

    def _failed(self, message: str) -> None:
        if self.estimate_label.text() == ESTIMATING:  # it failed before any estimate
            self.estimate_label.setText("")
        self.progress.setVisible(False)
        self.status.setText(message)
        self.status.setStyleSheet("color: #c0392b;")
        self.settings_button.setVisible(True)
        self.cancel_button.setText("Close")
        self.show()
        self._fit()

    def _cancelled(self) -> None:
        self.status.setText("Loading was cancelled.")
        self.hide()

    def _cancel(self) -> None:
        if self.loader.busy:
            self.status.setText("Cancelling…")
            self.loader.cancel()
        else:
            self.hide()

    def hideEvent(self, event: QHideEvent) -> None:
        if self.awaiting_choice:
            self.awaiting_choice = False
            self.declined.emit()
        super().hideEvent(event)
