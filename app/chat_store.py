"""Chats kept in SQLite: conversations, messages with parent ids (branches), search.

The database is in WAL mode and every finished message is committed at once, so a killed app
loses at most the reply being generated. A corrupt database is moved aside (never deleted),
a fresh one is created, and ``recovery_message`` says so for the user. No Qt in here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from app.conversation import Conversation, Message
from app.settings import move_aside

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


class ChatStore:
    """One SQLite file of chats. Use from one thread (the UI thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recovery_message: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect()
        except sqlite3.DatabaseError as error:
            self.db = self._recover(error)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {row}")
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _recover(self, error: sqlite3.DatabaseError) -> sqlite3.Connection:
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

    def list_conversations(self) -> list[ConversationSummary]:
        rows = self.db.execute("SELECT id, title, updated FROM conversations ORDER BY updated DESC")
        return [ConversationSummary(*row) for row in rows]

    def save_conversation(self, conversation: Conversation) -> None:
        selected = json.dumps({str(k): v for k, v in conversation.selected.items()})
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
        self.db.commit()

    def save_message(self, conversation: Conversation, message: Message) -> None:
        """Commit one message (and the conversation's branch choices) right away."""
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
        self.save_conversation(conversation)

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
        self.db.execute(
            "UPDATE conversations SET title = ?, updated = ? WHERE id = ?",
            (title, time.time(), conversation_id),
        )
        self.db.commit()

    def delete(self, conversation_id: str) -> None:
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self.db.commit()

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
