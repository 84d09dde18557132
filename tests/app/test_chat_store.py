"""SQLite chat storage: branches survive a restart, search, delete, crash safety, corruption."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from app.chat_store import ChatStore, snippet
from app.conversation import Conversation


def saved_chat(store: ChatStore, title: str, *texts: str) -> Conversation:
    chat = Conversation(title=title, system_prompt="sys")
    store.save_conversation(chat)
    for index, text in enumerate(texts):
        message = chat.append("user" if index % 2 == 0 else "assistant", text)
        store.save_message(chat, message)
    return chat


def test_branches_and_choices_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = saved_chat(store, "Experts", "hi", "hello")
    first_user = chat.active_path()[0]
    edited = chat.edit(first_user.id, "hi again")
    store.save_message(chat, edited)
    chat.step_branch(edited.id, -1)
    store.save_conversation(chat)
    store.close()

    loaded = ChatStore(path).load(chat.id)
    assert loaded.title == "Experts" and loaded.system_prompt == "sys"
    assert len(loaded.messages) == 3, "the edited branch is stored too"
    assert [m.content for m in loaded.active_path()] == ["hi", "hello"], "branch choice kept"


def test_database_uses_wal_and_each_message_is_committed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = saved_chat(store, "t", "first question")
    other = sqlite3.connect(path)  # another process would see exactly this
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = other.execute("SELECT content FROM messages WHERE conversation_id = ?", (chat.id,))
    assert [r[0] for r in rows] == ["first question"]


def test_search_finds_titles_and_message_text_across_chats(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "c.sqlite3")
    a = saved_chat(store, "Cooking", "how long to boil an egg", "about 9 minutes")
    b = saved_chat(store, "Routers", "what does the MoE router do", "it picks experts")
    saved_chat(store, "Other", "nothing here")
    hits = store.search("EXPERTS")
    assert [(h.conversation_id, h.snippet) for h in hits] == [(b.id, "it picks experts")]
    assert [h.conversation_id for h in store.search("cook")] == [a.id]
    assert store.search("   ") == []


def test_search_treats_percent_and_underscore_literally(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "c.sqlite3")
    saved_chat(store, "t", "100% sure")
    saved_chat(store, "u", "1000 sure")
    assert [h.snippet for h in store.search("0%")] == ["100% sure"]
    assert store.search("_") == []


def test_rename_and_delete(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "c.sqlite3")
    chat = saved_chat(store, "old", "hello")
    store.rename(chat.id, "  new name ")
    assert [c.title for c in store.list_conversations()] == ["new name"]
    store.delete(chat.id)
    assert store.list_conversations() == []
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_corrupt_database_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = ChatStore(path)
    assert store.recovery_message is not None and "damaged" in store.recovery_message
    kept = list(tmp_path.glob("chats.sqlite3.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not a database")
    saved_chat(store, "fresh", "works again")
    assert [c.title for c in store.list_conversations()] == ["fresh"]


def test_snippet_centres_on_the_match() -> None:
    text = "a " * 100 + "needle" + " b" * 100
    piece = snippet(text, "needle", width=20)
    assert "needle" in piece and piece.startswith("…") and piece.endswith("…")
