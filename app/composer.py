"""The message box under the chat: Send, Stop, Regenerate, and editing a past message.

The box grows with its text from ``MIN_LINES`` to ``MAX_LINES`` lines, then scrolls.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QStyle,
    QVBoxLayout,
    QWidget,
)

RETURN_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)
SHIFT = Qt.KeyboardModifier.ShiftModifier
CONTROL = Qt.KeyboardModifier.ControlModifier
MIN_LINES, MAX_LINES = 2, 8


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
        self.text.setFrameShape(QFrame.Shape.NoFrame)
        self.text.installEventFilter(self)
        self.text.document().contentsChanged.connect(self.fit_height)
        self.send_button = self._button("Send", QStyle.StandardPixmap.SP_ArrowForward)
        self.stop_button = self._button("Stop", QStyle.StandardPixmap.SP_MediaStop)
        self.regenerate_button = self._button("Regenerate", QStyle.StandardPixmap.SP_BrowserReload)
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.submit)
        self.stop_button.clicked.connect(self.stop_requested)
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        self._layout()
        self.set_generating(False)
        self.fit_height()

    def _button(self, title: str, icon: QStyle.StandardPixmap) -> QPushButton:
        button = QPushButton(self.style().standardIcon(icon), title)
        button.setCursor(Qt.CursorShape.PointingHandCursor)
        return button

    def _layout(self) -> None:
        self.frame = QFrame()
        self.frame.setObjectName("composerFrame")
        self.frame.setFrameShape(QFrame.Shape.StyledPanel)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (self.regenerate_button, self.stop_button, self.send_button):
            buttons.addWidget(button)
        inside = QVBoxLayout(self.frame)
        inside.setContentsMargins(8, 6, 6, 6)
        inside.setSpacing(4)
        inside.addWidget(self.text)
        inside.addLayout(buttons)
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.edit_banner)
        column.addWidget(self.frame)

    def lines_shown(self) -> int:
        """Lines the box is sized for now: its text's lines within MIN_LINES..MAX_LINES."""
        lines = round(self.text.document().size().height())  # lines, in a QPlainTextEdit
        return max(MIN_LINES, min(MAX_LINES, lines))

    def fit_height(self) -> None:
        margins = self.text.contentsMargins()
        frame = 2 * self.text.frameWidth() + margins.top() + margins.bottom()
        padding = 2 * round(self.text.document().documentMargin())
        line = self.text.fontMetrics().lineSpacing()
        self.text.setFixedHeight(self.lines_shown() * line + padding + frame)

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
        self.stop_button.setText("Stop")
        self.regenerate_button.setEnabled(not generating)

    def set_stopping(self) -> None:
        """Stop was asked for; the engine stops after the token it is computing (seconds on a
        slow CPU), so say so instead of leaving Stop clickable and nothing changing."""
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stopping…")

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
