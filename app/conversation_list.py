"""The chat list on the left: new, rename, delete, and search across every chat."""

from __future__ import annotations

from PySide6.QtCore import QPoint, Qt, Signal
from PySide6.QtWidgets import (
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from app.chat_store import ChatStore

ID_ROLE = Qt.ItemDataRole.UserRole


class ConversationList(QWidget):
    conversation_chosen = Signal(str)
    new_requested = Signal()
    export_requested = Signal(str)
    deleted = Signal(str)

    def __init__(self, store: ChatStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.current_id: str | None = None  # the chat shown; selected whenever it is listed
        self.new_button = QPushButton("New chat")
        self.new_button.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_FileIcon))
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search all chats (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.items = QListWidget()
        self.items.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.items.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.items.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.items.setSpacing(3)  # a style sheet here would stop the list following the theme
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 0, 6)
        for widget in (self.new_button, self.search, self.items):
            layout.addWidget(widget)
        self.new_button.clicked.connect(self.new_requested)
        self.search.textChanged.connect(self.refresh)
        self.items.itemActivated.connect(self._chosen)
        self.items.itemClicked.connect(self._chosen)
        self.items.itemChanged.connect(self._renamed)
        self.items.customContextMenuRequested.connect(self._menu)

    def refresh(self) -> None:
        """Show every chat, or the search hits when the search box has text."""
        self.items.blockSignals(True)
        self.items.clear()
        query = self.search.text().strip()
        if query:
            for hit in self.store.search(query):
                self._add(hit.conversation_id, f"{hit.title}\n  {hit.snippet}", editable=False)
        else:
            for summary in self.store.list_conversations():
                self._add(summary.id, summary.title, editable=True)
        if self.current_id is not None:
            self._select_row(self.current_id)
        self.items.blockSignals(False)

    def _add(self, conversation_id: str, text: str, editable: bool) -> None:
        item = QListWidgetItem(text)
        item.setData(ID_ROLE, conversation_id)
        if editable:
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        self.items.addItem(item)

    def select(self, conversation_id: str) -> None:
        """Mark the chat shown; its row is selected now and after every refresh."""
        self.current_id = conversation_id
        self._select_row(conversation_id)

    def _select_row(self, conversation_id: str) -> None:
        self.items.clearSelection()
        for row in range(self.items.count()):
            item = self.items.item(row)
            if item.data(ID_ROLE) == conversation_id:
                self.items.setCurrentItem(item)
                return

    def _chosen(self, item: QListWidgetItem) -> None:
        self.conversation_chosen.emit(item.data(ID_ROLE))

    def _renamed(self, item: QListWidgetItem) -> None:
        self.rename(item.data(ID_ROLE), item.text())

    def rename(self, conversation_id: str, title: str) -> None:
        self.store.rename(conversation_id, title)
        self.refresh()
        self.select(conversation_id)

    def delete(self, conversation_id: str) -> None:
        self.store.delete(conversation_id)
        self.refresh()
        self.deleted.emit(conversation_id)

    def _menu(self, position: QPoint) -> None:
        item = self.items.itemAt(position)
        if item is None:
            return
        conversation_id = item.data(ID_ROLE)
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.items.editItem(item))
        menu.addAction("Export…", lambda: self.export_requested.emit(conversation_id))
        menu.addAction("Delete", lambda: self.delete(conversation_id))
        menu.popup(self.items.viewport().mapToGlobal(position))
