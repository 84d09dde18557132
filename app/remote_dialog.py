"""Models > Add remote…: name, base URL, optional API key and model name of an
OpenAI-compatible server. The fields are checked when Connect is pressed; a problem is shown
under them and nothing is saved until they are right."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from app.remote_store import RemoteEntry

HELP = (
    "Use a server that speaks the OpenAI API (vLLM, SGLang, llama-server, Ollama, or "
    "Understudy's own `python -m engine serve`). The app connects only to this address."
)


class RemoteDialog(QDialog):
    """Emits ``accepted_entry(entry, key)``; ``key`` is "" when none was given."""

    accepted_entry = Signal(object, str)

    def __init__(self, parent: QWidget | None = None, entry: RemoteEntry | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add remote engine")
        self.name = QLineEdit(entry.name if entry else "")
        self.url = QLineEdit(entry.base_url if entry else "http://127.0.0.1:8000/v1")
        self.key = QLineEdit()
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        self.key.setPlaceholderText("optional; stored in the system keyring")
        self.model = QLineEdit(entry.model if entry else "")
        self.problem = QLabel()
        self.problem.setWordWrap(True)
        self._layout()
        # wide enough for the key field's hint and a typical URL (it was cut off at 320 px)
        hint = self.key.fontMetrics().horizontalAdvance(self.key.placeholderText())
        self.setMinimumWidth(hint + self.fontMetrics().horizontalAdvance("Base URL") + 100)

    def _layout(self) -> None:
        form = QFormLayout()
        form.addRow("Name", self.name)
        form.addRow("Base URL", self.url)
        form.addRow("API key", self.key)
        form.addRow("Model", self.model)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Connect")
        buttons.accepted.connect(self.submit)
        buttons.rejected.connect(self.reject)
        note = QLabel(HELP)
        note.setWordWrap(True)
        column = QVBoxLayout(self)
        column.addWidget(note)
        column.addLayout(form)
        column.addWidget(self.problem)
        column.addWidget(buttons)

    def entry(self) -> RemoteEntry:
        """The entry the fields describe; ``ValueError`` says what is wrong."""
        name = self.name.text().strip() or self.model.text().strip()
        has_key = bool(self.key.text().strip())
        return RemoteEntry(name, self.url.text(), self.model.text().strip(), has_key)

    def submit(self) -> None:
        try:
            entry = self.entry()
        except ValueError as error:
            self.problem.setText(f"<b>{error}.</b>")
            return
        self.accepted_entry.emit(entry, self.key.text().strip())
        self.accept()
