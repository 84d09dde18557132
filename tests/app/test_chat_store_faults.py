"""The chat database under faults: only corruption moves a database aside; a read-only or
full disk opens what is there and says what to fix; a failed write loses nothing and the
typed text stays in the box."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt

from app.chat_store import ChatStore, ChatStoreError
from app.conversation import Conversation
from app.main_window import MainWindow
from tests.app.fake_engine import FakeEngine

SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]  # as SQLite itself sets it
    return error


def healthy_database(path: Path) -> Conversation:
    store = ChatStore(path)
    chat = Conversation(title="Keep me")
    store.save_message(chat, chat.append("user", "precious question"))
    store.close()
    return chat


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (sqlite_error("database or disk is full", SQLITE_FULL), "disk is full"),
        (sqlite_error("attempt to write a readonly database", SQLITE_READONLY), "not writable"),
        (sqlite_error("disk I/O error", SQLITE_IOERR), "disk I/O error"),
        (PermissionError(13, "Permission denied"), "not writable"),
    ],
)
def test_an_error_that_is_not_corruption_never_moves_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    path = tmp_path / "chats.sqlite3"
    chat = healthy_database(path)
    before = path.read_bytes()

    def refuse(self: ChatStore) -> sqlite3.Connection:
        raise error

    monkeypatch.setattr(ChatStore, "_connect", refuse)
    store = ChatStore(path)
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []
    assert path.read_bytes() == before, "the file is left alone"
    assert store.read_only and store.recovery_message is not None
    assert "read-only" in store.recovery_message and reason in store.recovery_message
    assert "make" in store.recovery_message  # it says what to fix
    assert [c.title for c in store.list_conversations()] == ["Keep me"]  # history shown
    store.save_message(chat, chat.append("assistant", "in memory"))  # the session goes on
    store.close()
    monkeypatch.undo()
    again = ChatStore(path)
    assert [m.content for m in again.load(chat.id).active_path()] == ["precious question"]


def test_an_unreadable_data_folder_keeps_chats_in_memory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_folder(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", no_folder)
    store = ChatStore(tmp_path / "ro" / "chats.sqlite3")  # used to crash the app at start
    assert store.read_only and "in memory only" in (store.recovery_message or "")
    chat = Conversation(title="t")
    store.save_message(chat, chat.append("user", "hi"))
    assert store.load(chat.id).active_path()[0].content == "hi"


def test_real_corruption_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    healthy_database(path)
    data = bytearray(path.read_bytes())
    assert len(data) >= 8192, "the test needs the second page"
    data[4096:8192] = b"\xff" * 4096  # a page of the tables, garbage: SQLite says corrupt
    path.write_bytes(bytes(data))
    store = ChatStore(path)
    assert not store.read_only and "damaged" in (store.recovery_message or "")
    (kept,) = tmp_path.glob("chats.sqlite3.corrupt-*")
    assert kept.read_bytes() == bytes(data), "the damaged file is kept, not deleted"
    assert store.list_conversations() == []


class FullDisk:
    """A connection whose writes fail as on a full disk; reads pass through."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite_error("database or disk is full", SQLITE_FULL)
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_failed_write_raises_a_message_and_keeps_what_was_saved(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    chat = healthy_database(path)
    store = ChatStore(path)
    store.db = FullDisk(store.db)  # type: ignore[assignment]
    with pytest.raises(ChatStoreError, match=r"disk is full.*intact"):
        store.save_message(chat, chat.append("assistant", "lost?"))
    with pytest.raises(ChatStoreError):
        store.rename(chat.id, "new")
    store.db = store.db.db  # type: ignore[attr-defined]
    assert [m.content for m in store.load(chat.id).active_path()] == ["precious question"]
    assert store.list_conversations()[0].title == "Keep me"


def test_typed_text_survives_a_failed_send(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    window.chat_store.db = FullDisk(window.chat_store.db)  # type: ignore[assignment]
    window.composer.text.setPlainText("a long message I typed")
    qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "disk is full" in window.banner.text, timeout=3000)
    assert window.composer.text.toPlainText() == "a long message I typed"
    assert not fake_engine.calls.requests, "nothing was sent that could not be saved"
    chat = window.controller.conversation
    assert chat is None or not chat.messages, "no dangling message in the chat"
    window.chat_store.db = window.chat_store.db.db  # type: ignore[attr-defined]
