"""A message strip at the top of the chat: errors, warnings and offers with action buttons.

Non-modal, so it never blocks the event loop; every message shown is kept in ``history``.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtWidgets import QApplication, QFrame, QHBoxLayout, QLabel, QPushButton, QWidget

COLORS = {"error": "#f8d7da", "warning": "#fff3cd", "info": "#d1ecf1"}
TEXT_COLOR = "#1b1e21"


class Banner(QFrame):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history: list[tuple[str, str]] = []
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.row = QHBoxLayout(self)
        self.row.addWidget(self.label, 1)
        self.buttons: list[QPushButton] = []
        self.return_focus: QWidget | None = None  # gets the focus back when a button had it
        self.close_button = QPushButton("Dismiss")
        self.close_button.clicked.connect(self.dismiss)
        self.row.addWidget(self.close_button)
        self.setVisible(False)

    @property
    def text(self) -> str:
        return self.label.text() if not self.isHidden() else ""

    def show_message(
        self,
        text: str,
        kind: str = "error",
        actions: tuple[tuple[str, Callable[[], None]], ...] = (),
    ) -> None:
        self.history.append((kind, text))
        self._clear_buttons()
        self.label.setText(text)
        self.setStyleSheet(
            f"Banner {{ background: {COLORS.get(kind, COLORS['info'])}; border-radius: 4px; }}"
            f" QLabel {{ color: {TEXT_COLOR}; }}"
        )
        for title, callback in actions:
            button = QPushButton(title)
            button.clicked.connect(callback)
            button.clicked.connect(self.dismiss)
            self.row.insertWidget(self.row.count() - 1, button)
            self.buttons.append(button)
        self.setVisible(True)

    def _clear_buttons(self) -> None:
        for button in self.buttons:
            button.deleteLater()
        self.buttons = []

    def dismiss(self) -> None:
        focus = QApplication.focusWidget()
        had_focus = focus is not None and (focus is self or self.isAncestorOf(focus))
        if had_focus and self.return_focus is not None:
            self.return_focus.setFocus()  # before hiding, or Qt moves it to the next field
        self._clear_buttons()
        self.setVisible(False)
