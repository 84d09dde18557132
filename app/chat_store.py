"""Chats kept in SQLite: conversations, messages with parent ids (branches), search.

The database is in WAL mode and every finished message is committed at once, so a killed app
loses at most the reply being generated. Only real corruption (SQLite says the file is
corrupt or not a database, or the integrity check fails) moves a database aside (never
deleted) for a fresh one. Any other error opening it (a read-only folder, a full disk, a
permission error, a lock) leaves the file alone and opens it read-only, or, when it cannot be
read at all, keeps this session's chats in memory; ``recovery_message`` says which and what to
fix. A write that fails raises ``ChatStoreError`` with a message for the user. No Qt in here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from app.conversation import Conversation, Message
from app.settings import move_aside

CORRUPTION_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    selected TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    finished INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id);
"""


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated: float


@dataclass(frozen=True)
class SearchHit:
    conversation_id: str
    title: str
    message_id: str | None
    snippet: str


class ChatStoreError(Exception):
    """The chat database could not be written; the message says why and what to do."""


class CorruptDatabaseError(sqlite3.DatabaseError):
    """The integrity check failed: the file is damaged, not merely unwritable."""


def is_corruption(error: BaseException) -> bool:
    """True only for a damaged database, never for permissions, a full disk or a lock."""
    if isinstance(error, CorruptDatabaseError):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in CORRUPTION_CODES


def _reason(error: BaseException) -> str:
    text = str(error).lower()
    if "full" in text:
        return "the disk is full"
    if "readonly" in text or "read-only" in text or "permission" in text:
        return "the folder or file is not writable"
    if "locked" in text or "busy" in text:
        return "another program holds the database locked"
    return str(error)


def _check(db: sqlite3.Connection) -> None:
    row = db.execute("PRAGMA quick_check").fetchone()
    if row is None or row[0] != "ok":
        raise CorruptDatabaseError(f"integrity check failed: {row}")


class ChatStore:
    """One SQLite file of chats. Use from one thread (the UI thread).

    ``read_only`` is set when the file could only be opened for reading (or not at all:
    then this session's chats live in memory); writes then change nothing on disk, as the
    ``recovery_message`` shown at start says.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recovery_message: str | None = None
        self.read_only = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = self._connect()
        except (sqlite3.Error, OSError) as error:
            self.db = self._recover(error) if is_corruption(error) else self._fallback(error)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            _check(db)
            db.executescript(SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _fallback(self, error: BaseException) -> sqlite3.Connection:
        """Not corruption: leave the file alone; read it if possible, else keep chats in memory."""
        self.read_only = True
        fix = (
            f"To keep new chats, make {self.path.parent} writable or free some disk space, then "
            "restart Understudy."
        )
        try:
            db = self._copy_to_memory(self._open_read_only())
        except (sqlite3.Error, OSError) as second:
            self.recovery_message = (
                f"The chat history at {self.path} cannot be opened ({_reason(error)}; "
                f"{_reason(second)}). It was left untouched. Chats in this session are kept "
                f"in memory only and are lost when you close the app. {fix}"
            )
            return self._memory()
        self.recovery_message = (
            f"The chat history at {self.path} is open read-only ({_reason(error)}): your chats "
            f"are shown, but new messages are not saved. {fix}"
        )
        return db

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise sqlite3.OperationalError("there is no chat database yet")
        last: sqlite3.Error | None = None
        for mode in ("mode=ro", "immutable=1"):  # immutable: no -shm can be made next to it
            try:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{mode}", uri=True)
                _check(db)
                db.execute("SELECT COUNT(*) FROM conversations").fetchone()
                return db
            except sqlite3.Error as error:
                last = error
        assert last is not None, "both modes were tried"
        raise last

    def _copy_to_memory(self, source: sqlite3.Connection) -> sqlite3.Connection:
        """The read-only file's chats, copied into memory so this session can still chat."""
        db = sqlite3.connect(":memory:")
        try:
            source.backup(db)
        finally:
            source.close()
        db.executescript(SCHEMA)
        return db

    @staticmethod
    def _memory() -> sqlite3.Connection:
        db = sqlite3.connect(":memory:")
        db.executescript(SCHEMA)
        return db

    def _recover(self, error: BaseException) -> sqlite3.Connection:
        try:
            return self._start_fresh(error)
        except (sqlite3.Error, OSError) as second:  # damaged and the folder is not writable
            self.read_only = True
            self.recovery_message = (
                f"The chat database {self.path} is damaged ({error}) and could not be moved "
                f"aside ({_reason(second)}). It was left untouched; chats in this session are "
                "kept in memory only."
            )
            return self._memory()

    def _start_fresh(self, error: BaseException) -> sqlite3.Connection:
        aside = move_aside(self.path)
        for suffix in ("-wal", "-shm"):
            extra = self.path.with_name(self.path.name + suffix)
            if extra.exists():
                extra.rename(aside.with_name(aside.name + suffix))
        self.recovery_message = (
            f"The chat database was damaged ({error}) and could not be opened. It was kept as "
            f"{aside} and a new, empty one was started."
        )
        return self._connect()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """One committed write; a failure rolls back and becomes a ``ChatStoreError``."""
        try:
            yield
            self.db.commit()
        except sqlite3.Error as error:
            with suppress(sqlite3.Error):
                self.db.rollback()
            raise ChatStoreError(
                f"Could not save {what}: {_reason(error)}. What was saved before is intact; "
                "free some disk space or check the folder's permissions, then try again."
            ) from error

    def list_conversations(self) -> list[ConversationSummary]:
        rows = self.db.execute("SELECT id, title, updated FROM conversations ORDER BY updated DESC")
        return [ConversationSummary(*row) for row in rows]

    def save_conversation(self, conversation: Conversation) -> None:
        selected = json.dumps({str(k): v for k, v in conversation.selected.items()})
        with self._writing("the chat"):
            self._upsert_conversation(conversation, selected)

    def _upsert_conversation(self, conversation: Conversation, selected: str) -> None:
        self.db.execute(
            "INSERT INTO conversations (id, title, system_prompt, created, updated, selected) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET title = excluded.title, "
            "system_prompt = excluded.system_prompt, updated = excluded.updated, "
            "selected = excluded.selected",
            (
                conversation.id,
                conversation.title,
                conversation.system_prompt,
                conversation.created,
                time.time(),
                selected,
            ),
        )

    def save_message(self, conversation: Conversation, message: Message) -> None:
        """Commit one message (and the conversation's branch choices) right away, together."""
        selected = json.dumps({str(k): v for k, v in conversation.selected.items()})
        with self._writing("the message"):
            self._upsert_conversation(conversation, selected)
            self._insert_message(conversation, message)

    def _insert_message(self, conversation: Conversation, message: Message) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO messages "
            "(id, conversation_id, parent_id, role, content, created, note, finished) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.id,
                conversation.id,
                message.parent_id,
                message.role,
                message.content,
                message.created,
                message.note,
                int(message.finished),
            ),
        )

    def load(self, conversation_id: str) -> Conversation:
        row = self.db.execute(
            "SELECT title, system_prompt, created, selected FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            raise KeyError(f"no chat with id {conversation_id!r}")
        conversation = Conversation(conversation_id, row[0], row[1], row[2])
        for message in self._messages(conversation_id):
            conversation.messages[message.id] = message
        selected = json.loads(row[3] or "{}")
        conversation.selected = {(None if k == "None" else k): v for k, v in selected.items()}
        return conversation

    def _messages(self, conversation_id: str) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, parent_id, role, content, created, note, finished FROM messages "
            "WHERE conversation_id = ? ORDER BY created",
            (conversation_id,),
        )
        return [Message(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def rename(self, conversation_id: str, title: str) -> None:
        title = title.strip() or "Untitled chat"
        with self._writing("the new name"):
            self.db.execute(
                "UPDATE conversations SET title = ?, updated = ? WHERE id = ?",
                (title, time.time(), conversation_id),
            )

    def delete(self, conversation_id: str) -> None:
        with self._writing("the deletion"):
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Chats whose title or any message contains ``query`` (case-insensitive)."""
        query = query.strip()
        if not query:
            return []
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self._search_titles(pattern, limit) + self._search_messages(pattern, query, limit)

    def _search_titles(self, pattern: str, limit: int) -> list[SearchHit]:
        rows = self.db.execute(
            "SELECT id, title FROM conversations WHERE title LIKE ? ESCAPE '\\' "
            "ORDER BY updated DESC LIMIT ?",
            (pattern, limit),
        )
        return [SearchHit(row[0], row[1], None, row[1]) for row in rows]

    def _search_messages(self, pattern: str, query: str, limit: int) -> list[SearchHit]:
        rows = self.db.execute(
            "SELECT m.conversation_id, c.title, m.id, m.content FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.content LIKE ? ESCAPE '\\' ORDER BY c.updated DESC, m.created LIMIT ?",
            (pattern, limit),
        )
        return [SearchHit(r[0], r[1], r[2], snippet(r[3], query)) for r in rows]


def snippet(text: str, query: str, width: int = 60) -> str:
    """A short excerpt of ``text`` around the first match of ``query``."""
    flat = " ".join(text.split())
    at = flat.lower().find(query.lower())
    start = max(0, at - width // 2) if at >= 0 else 0
    piece = flat[start : start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(flat) else "")
