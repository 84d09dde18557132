"""The message box under the chat: Send, Stop, Regenerate, and editing a past message."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

RETURN_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)
SHIFT = Qt.KeyboardModifier.ShiftModifier
CONTROL = Qt.KeyboardModifier.ControlModifier


class Composer(QWidget):
    send_requested = Signal(str)
    edit_submitted = Signal(str, str)  # message id, new text
    stop_requested = Signal()
    regenerate_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.editing_id: str | None = None
        self.edit_banner = QLabel()
        self.edit_banner.setVisible(False)
        self.text = QPlainTextEdit()
        self.text.setPlaceholderText("Message (Enter sends, Shift+Enter adds a line)")
        self.text.setFixedHeight(80)
        self.text.installEventFilter(self)
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.regenerate_button = QPushButton("Regenerate")
        self.send_button.clicked.connect(self.submit)
        self.stop_button.clicked.connect(self.stop_requested)
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        self._layout()
        self.set_generating(False)

    def _layout(self) -> None:
        buttons = QVBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button):
            buttons.addWidget(button)
        row = QHBoxLayout()
        row.addWidget(self.text, 1)
        row.addLayout(buttons)
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.edit_banner)
        column.addLayout(row)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if (
            watched is self.text
            and isinstance(event, QKeyEvent)
            and event.type() == QEvent.Type.KeyPress
            and event.key() in RETURN_KEYS
            and not event.modifiers() & (SHIFT | CONTROL)
        ):
            self.submit()
            return True
        return super().eventFilter(watched, event)

    def set_generating(self, generating: bool) -> None:
        self.send_button.setEnabled(not generating)
        self.stop_button.setEnabled(generating)
        self.regenerate_button.setEnabled(not generating)

    def begin_edit(self, message_id: str, text: str) -> None:
        self.editing_id = message_id
        self.text.setPlainText(text)
        self.edit_banner.setText("Editing a message: Send keeps the old version as a branch.")
        self.edit_banner.setVisible(True)
        self.text.setFocus()

    def cancel_edit(self) -> None:
        self.editing_id = None
        self.edit_banner.setVisible(False)
        self.text.clear()

    def submit(self) -> None:
        if not self.send_button.isEnabled():
            return
        text = self.text.toPlainText().strip()
        if not text:
            return
        editing = self.editing_id
        self.cancel_edit()
        if editing is not None:
            self.edit_submitted.emit(editing, text)
        else:
            self.send_requested.emit(text)
