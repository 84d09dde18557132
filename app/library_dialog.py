"""The Models window: built-in, added, models-folder and Hugging Face cache models in a table
with architecture, size, experts and top-k (from ``EngineAPI.inspect``); the loaded model is
marked; add a folder, remove an added one from the list (its files stay), load. A row that
cannot be loaded (unreadable, dense) keeps Load disabled with the reason as its tooltip; long
cells are elided at a capped column width, the whole text in the cell's tooltip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.bridge import EngineBridge
from app.model_library import ModelEntry, all_models, check_model_folder, human_bytes
from app.tasks import start_task
from engine.events import ModelInfo

COLUMNS = ("Name", "Source", "Architecture", "Quant", "Size", "Experts", "Top-k")
EXPERTS, TOP_K = 5, 6
LOADED_MARK = "● "
NOT_REMOVABLE = "Only folders you added can be removed from this list."
MAX_COLUMN_WIDTH = 280  # px: a long error or name is elided rather than widening the table


def browse_start(added: Sequence[str], home: Path | None = None) -> Path:
    """Where the file pickers open: beside the last model added, else Downloads, else home.

    Not the folder the app happened to be started from (a source checkout, or /).
    """
    home = home if home is not None else Path.home()
    for candidate in [*(Path(a).parent for a in reversed(added)), home / "Downloads", home]:
        if candidate.is_dir():
            return candidate
    return home


class LibraryDialog(QDialog):
    load_requested = Signal(str)  # model folder
    folder_added = Signal(str)
    folder_removed = Signal(str)

    def __init__(
        self,
        bridge: EngineBridge | None,
        added: tuple[str, ...],
        hf_cache: Path | None = None,
        parent: QWidget | None = None,
        loaded: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.resize(1000, 420)
        self.bridge, self.added, self.hf_cache = bridge, added, hf_cache
        self.loaded = loaded.resolve() if loaded is not None else None
        self.entries: list[ModelEntry] = []
        self.problems: dict[int, str] = {}  # row -> why that model cannot be loaded
        self.task: asyncio.Task[None] | None = None
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)  # fitted, capped
        header.setStretchLastSection(True)
        self.remove_button = QPushButton("Remove from list")
        self.remove_button.clicked.connect(self.remove_selected)
        self.load_button = QPushButton("Load")
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.message = QLabel("Models are used where they are; nothing is copied.")
        self.message.setWordWrap(True)
        self._layout()

    def _layout(self) -> None:
        add, rescan, load = QPushButton("Add folder…"), QPushButton("Rescan"), self.load_button
        add_file = QPushButton("Add GGUF file…")
        add.clicked.connect(self.choose_folder)
        add_file.clicked.connect(self.choose_file)
        rescan.clicked.connect(self.rescan)
        load.clicked.connect(self._load_selected)
        self.table.itemDoubleClicked.connect(lambda _item: self._load_selected())
        buttons = QHBoxLayout()
        for button in (add, add_file, self.remove_button, rescan):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(load)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(self.message)
        layout.addLayout(buttons)

    def rescan(self) -> None:
        self.entries = all_models(self.added, self.hf_cache)
        self.table.setRowCount(len(self.entries))
        self.problems = {}
        for row, entry in enumerate(self.entries):
            size = human_bytes(entry.size_bytes)
            values = (entry.name, entry.source, entry.architecture, entry.quant, size)
            for column, value in enumerate((*values, *_pending(entry))):
                self._set(row, column, value)
            if entry.problem or entry.moe is False:
                self.problems[row] = _why_not(entry)
            self._name_tooltip(row, entry)
            self._mark_if_loaded(row, entry)
        self._fit_columns()
        self._selection_changed()
        if self.bridge is not None:
            self.task = start_task(self, self._inspect_all(), self.bridge.loop)

    async def _inspect_all(self) -> None:
        assert self.bridge is not None, "checked in rescan"
        for row, entry in enumerate(list(self.entries)):
            if entry.moe is False or entry.problem:
                continue  # a dense or unreadable GGUF: the row already says so
            try:
                info = await self.bridge.inspect(entry.path)
            except Exception as error:
                self._set_row(row, None, f"cannot read: {error}")
            else:
                self._set_row(row, info, "")

    def _set(self, row: int, column: int, text: str) -> None:
        item = QTableWidgetItem(" ".join(text.split()))  # one line: no tall rows
        item.setToolTip(text)  # the whole text, also where a column is narrow or elided
        self.table.setItem(row, column, item)

    def _fit_columns(self) -> None:
        """Fit each column to its contents, up to MAX_COLUMN_WIDTH (the rest is elided)."""
        self.table.resizeColumnsToContents()
        for column in range(self.table.columnCount()):
            if self.table.columnWidth(column) > MAX_COLUMN_WIDTH:
                self.table.setColumnWidth(column, MAX_COLUMN_WIDTH)
        self._fit_width()

    def _fit_width(self) -> None:
        """Grow (never shrink) to show every column, up to the screen: Top-k was off the edge."""
        table = self.table
        needed = self.width() - table.viewport().width() + table.horizontalHeader().length()
        screen = self.screen()
        most = screen.availableGeometry().width() - 40 if screen is not None else needed
        if self.width() < needed:
            self.resize(min(needed, most), self.height())

    def _name_tooltip(self, row: int, entry: ModelEntry) -> None:
        """Where the model is: two files of one name (LM Studio, models folder) tell apart."""
        item = self.table.item(row, 0)
        assert item is not None, "rescan fills every cell"
        item.setToolTip(f"{entry.name}\n{entry.path}")

    def is_loaded(self, entry: ModelEntry) -> bool:
        return self.loaded is not None and entry.path.resolve() == self.loaded

    def set_loaded(self, loaded: Path | None) -> None:
        """Another model was loaded (or none is) while the window is open: move the mark."""
        self.loaded = loaded.resolve() if loaded is not None else None
        for row, entry in enumerate(self.entries):
            self._mark_if_loaded(row, entry)
        self._selection_changed()

    def _mark_if_loaded(self, row: int, entry: ModelEntry) -> None:
        item = self.table.item(row, 0)
        assert item is not None, "rescan fills every cell"
        loaded = self.is_loaded(entry)
        item.setText(LOADED_MARK + entry.name + " (loaded)" if loaded else entry.name)
        font = QFont(item.font())
        font.setBold(loaded)
        item.setFont(font)

    def _set_row(self, row: int, info: ModelInfo | None, problem: str) -> None:
        if row >= self.table.rowCount():
            return
        if info is None:
            self._set(row, EXPERTS, problem)
            self._set(row, TOP_K, "")
            self.problems[row] = problem
        else:
            self._set(row, 2, info.architecture)
            self._set(row, EXPERTS, f"{info.experts_per_layer} × {info.moe_layers} layers")
            self._set(row, TOP_K, str(info.top_k))
        self._fit_columns()
        self._selection_changed()

    def choose_file(self) -> None:
        file, _filter = QFileDialog.getOpenFileName(
            self, "Choose a GGUF model file", self._browse_start(), "GGUF models (*.gguf)"
        )
        if file:
            self.add_folder(Path(file))

    def choose_folder(self) -> None:
        start = self._browse_start()
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder", start)
        if folder:
            self.add_folder(Path(folder))

    def _browse_start(self) -> str:
        added = [str(e.path) for e in self.entries if e.source == "added"]  # not the built-in
        return str(browse_start(added))

    def add_folder(self, folder: Path) -> bool:
        try:
            check_model_folder(folder)
        except ValueError as error:
            self.message.setText(str(error))
            return False
        self.added = (*self.added, str(folder))
        self.folder_added.emit(str(folder))
        self.message.setText(f"Added {folder} (used in place, not copied).")
        self.rescan()
        return True

    def _selected(self) -> ModelEntry | None:
        row = self.table.currentRow()
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def _selection_changed(self) -> None:
        entry = self._selected()
        removable = entry is not None and entry.source == "added"
        self.remove_button.setEnabled(removable)
        self.remove_button.setToolTip("" if removable else NOT_REMOVABLE)
        problem = self.problems.get(self.table.currentRow(), "")
        self.load_button.setEnabled(entry is not None and not problem)
        self.load_button.setToolTip(problem or ("" if entry else "Choose a model in the list"))

    def remove_selected(self) -> None:
        """Take an added folder off the list; nothing on disk is touched."""
        entry = self._selected()
        if entry is None or entry.source != "added":
            return
        self.added = tuple(p for p in self.added if Path(p).resolve() != entry.path.resolve())
        self.folder_removed.emit(str(entry.path))
        note = " It stays loaded until you load another model." if self.is_loaded(entry) else ""
        self.message.setText(f"Removed {entry.path} from the list (its files are kept).{note}")
        self.rescan()

    def _load_selected(self) -> None:
        row = self.table.currentRow()
        if row in self.problems:  # a double-click on an unreadable row: say why, load nothing
            self.message.setText(f"{self.entries[row].name} cannot be loaded: {self.problems[row]}")
        elif 0 <= row < len(self.entries):
            self.message.setText(f"Loading {self.entries[row].name}… (see the main window)")
            self.load_requested.emit(str(self.entries[row].path))


def _pending(entry: ModelEntry) -> tuple[str, str]:
    """Experts and top-k cells before inspection: a dense or unreadable GGUF says why."""
    if entry.problem:
        return f"cannot read: {entry.problem}", ""
    if entry.moe is False:
        return "dense (not MoE)", ""
    return "…", "…"


def _why_not(entry: ModelEntry) -> str:
    """Why a GGUF row cannot be loaded, as the end of "<name> cannot be loaded: …"."""
    if entry.problem:
        return f"it cannot be read as GGUF: {entry.problem}"
    kind = f"{entry.architecture} " if entry.architecture else ""
    return (
        f"it is a dense {kind}model with no expert tensors; "
        "Understudy runs Mixture-of-Experts models only"
    )
