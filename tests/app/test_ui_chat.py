"""Chat behaviour through the main window with the fake engine: send, stream, stop,
regenerate, edit, branches, search, export, context overflow, shortcuts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from app.main_window import MainWindow
from tests.app.fake_engine import FakeEngine

LONG_REPLY = " ".join(f"word{i}" for i in range(300))


def send_and_wait(qtbot: Any, window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)


def path_texts(window: MainWindow) -> list[str]:
    assert window.controller.conversation is not None
    return [m.content for m in window.controller.conversation.active_path()]


def test_send_streams_the_reply_into_the_view_and_the_store(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["Here is `code`:\n\n```python\nprint('hi')\n```"])
    send_and_wait(qtbot, window, "Show me code")
    assert path_texts(window) == ["Show me code", "Here is `code`:\n\n```python\nprint('hi')\n```"]
    shown = window.chat_view.toPlainText()
    assert "Show me code" in shown and "print('hi')" in shown and "Copy" in shown
    request = fake_engine.calls.requests[-1]
    assert [m.role for m in request.messages] == ["system", "user"]
    assert window.composer.text.toPlainText() == "", "the box is cleared after sending"
    chat = window.controller.conversation
    assert chat is not None and chat.title == "Show me code"
    stored = window.chat_store.load(chat.id)
    assert [m.content for m in stored.active_path()] == path_texts(window)


def test_streaming_repaints_are_coalesced(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter([" ".join(["tok"] * 60)])
    fake_engine.token_delay = 0.002
    before = window.chat_view.render_count
    send_and_wait(qtbot, window, "go")
    renders = window.chat_view.render_count - before
    assert window.controller.timing.tokens == 60
    assert renders < 40, f"{renders} repaints for 60 tokens: not coalesced"


def test_copy_links_put_the_message_and_the_code_block_on_the_clipboard(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["Run:\n\n```sh\nls -la\n```"])
    send_and_wait(qtbot, window, "list files")
    reply = window.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
    window.chat_view.follow_link(f"copy-code:{reply.id}:0")
    assert QGuiApplication.clipboard().text() == "ls -la"
    window.chat_view.follow_link(f"copy-msg:{reply.id}")
    assert QGuiApplication.clipboard().text() == "Run:\n\n```sh\nls -la\n```"


def test_stop_ends_the_reply_early_and_keeps_what_was_written(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter([LONG_REPLY])
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("talk a lot")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens >= 3, timeout=5000)
    assert window.composer.stop_button.isEnabled() and not window.composer.send_button.isEnabled()
    qtbot.mouseClick(window.composer.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    reply = window.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
    assert reply.content.startswith("word0 word1") and len(reply.content) < len(LONG_REPLY)
    assert reply.note == "Stopped." and reply.finished
    assert window.composer.send_button.isEnabled()


def test_escape_stops_generation(qtbot: Any, window: MainWindow, fake_engine: FakeEngine) -> None:
    fake_engine.replies = iter([LONG_REPLY])
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("talk")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens >= 2, timeout=5000)
    qtbot.keyClick(window.composer.text, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert window.controller.conversation.active_path()[-1].note == "Stopped."  # type: ignore[union-attr]


def test_regenerate_keeps_the_first_reply_as_a_branch(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["first answer", "second answer"])
    send_and_wait(qtbot, window, "question")
    qtbot.mouseClick(window.composer.regenerate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert path_texts(window) == ["question", "second answer"]
    assert "2/2" in window.chat_view.toPlainText()
    reply = window.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
    window.chat_view.follow_link(f"prev:{reply.id}")
    assert path_texts(window) == ["question", "first answer"]
    assert "1/2" in window.chat_view.toPlainText()
    assert len(fake_engine.calls.requests[-1].messages) == 2, "regenerate resends the question"


def test_ctrl_enter_regenerates(qtbot: Any, window: MainWindow, fake_engine: FakeEngine) -> None:
    fake_engine.replies = iter(["one", "two"])
    send_and_wait(qtbot, window, "q")
    qtbot.keyClick(window.chat_view, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: path_texts(window) == ["q", "two"], timeout=5000)


def test_edit_continues_as_a_new_branch_and_keeps_the_old_one(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["answer A", "answer B"])
    send_and_wait(qtbot, window, "version A")
    first_user = window.controller.conversation.active_path()[0]  # type: ignore[union-attr]
    window.chat_view.follow_link(f"edit:{first_user.id}")
    assert window.composer.text.toPlainText() == "version A"
    assert window.composer.edit_banner.isVisibleTo(window)
    window.composer.text.setPlainText("version B")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert path_texts(window) == ["version B", "answer B"]
    assert fake_engine.calls.requests[-1].messages[-1].content == "version B"
    chat = window.chat_store.load(window.controller.conversation.id)  # type: ignore[union-attr]
    assert sorted(m.content for m in chat.messages.values()) == [
        "answer A",
        "answer B",
        "version A",
        "version B",
    ], "nothing erased, also in the database"


def test_context_overflow_note_is_shown(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.dropped = 2
    send_and_wait(qtbot, window, "a long chat")
    note = window.controller.conversation.active_path()[-1].note  # type: ignore[union-attr]
    assert note.startswith("The 2 oldest messages did not fit in the context window (2048 tokens)")
    assert "did not fit in the context window" in window.chat_view.toPlainText()


def test_engine_error_during_generation_is_shown_not_lost(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    from engine.errors import EngineOutOfMemoryError

    fake_engine.fail_generate = EngineOutOfMemoryError("GPU memory ran out; lower the context")
    send_and_wait(qtbot, window, "hi")
    assert "GPU memory ran out" in window.banner.text
    assert "Generation failed" in window.chat_view.toPlainText()


def test_search_across_chats_and_open_a_hit(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["bananas are yellow", "the sky is blue"])
    send_and_wait(qtbot, window, "fruit")
    fruit_id = window.controller.conversation.id  # type: ignore[union-attr]
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    send_and_wait(qtbot, window, "weather")
    qtbot.keyClick(window, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert window.sidebar.search.hasFocus()
    qtbot.keyClicks(window.sidebar.search, "banana")
    assert window.sidebar.items.count() == 1
    item = window.sidebar.items.item(0)
    assert "bananas are yellow" in item.text()
    window.sidebar._chosen(item)
    assert window.controller.conversation.id == fruit_id  # type: ignore[union-attr]


def test_new_rename_delete_chats(qtbot: Any, window: MainWindow) -> None:
    empty = window.controller.conversation
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert window.controller.conversation is empty, "an empty chat is reused, not piled up"
    send_and_wait(qtbot, window, "hello")
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    current = window.controller.conversation
    assert current is not None and current is not empty and window.sidebar.items.count() == 2
    window.sidebar.rename(current.id, "Renamed")
    assert window.chat_store.list_conversations()[0].title == "Renamed"
    window.sidebar.delete(current.id)
    assert current.id not in [c.id for c in window.chat_store.list_conversations()]
    assert window.controller.conversation is not None
    assert window.controller.conversation.id != current.id


def test_chats_survive_a_restart(qtbot: Any, make_window: Any, fake_engine: FakeEngine) -> None:
    first = make_window()
    send_and_wait(qtbot, first, "remember me")
    first.close()
    second = make_window()
    assert "remember me" in second.chat_view.toPlainText()


def test_export_from_the_window(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, tmp_path: Path
) -> None:
    send_and_wait(qtbot, window, "export this")
    chat_id = window.controller.conversation.id  # type: ignore[union-attr]
    window.export_conversation(chat_id, tmp_path / "out.md")
    window.export_conversation(chat_id, tmp_path / "out.json")
    assert "## User\n\nexport this" in (tmp_path / "out.md").read_text()
    assert (
        json.loads((tmp_path / "out.json").read_text())["messages"][0]["content"] == "export this"
    )
    window.export_conversation(chat_id, tmp_path / "out.pdf")
    assert "Could not export" in window.banner.text


def test_per_chat_system_prompt_is_sent(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    window.system_prompt.setText("Answer in French.")
    window.system_prompt.editingFinished.emit()
    send_and_wait(qtbot, window, "hello")
    assert fake_engine.calls.requests[-1].messages[0].content == "Answer in French."


def test_scroll_follows_only_while_at_the_bottom(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter([LONG_REPLY, LONG_REPLY])
    fake_engine.token_delay = 0.001
    send_and_wait(qtbot, window, "fill the view")
    bar = window.chat_view.verticalScrollBar()
    assert bar.maximum() > 0 and bar.value() == bar.maximum(), "followed the stream"
    bar.setValue(0)
    send_and_wait(qtbot, window, "more")
    assert bar.value() == 0, "the user scrolled up: the view stays put"


def test_a_kill_mid_reply_keeps_everything_but_the_last_second_of_the_reply(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    import sqlite3

    fake_engine.replies = iter(["finished answer", LONG_REPLY])
    send_and_wait(qtbot, window, "first")
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("second")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens >= 3, timeout=5000)
    # what another process (the app after a kill) would read from disk right now
    other = sqlite3.connect(user_dirs / "data" / "chats.sqlite3")
    rows = [r[0] for r in other.execute("SELECT content FROM messages ORDER BY created")]
    other.close()
    window.controller.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert rows[:3] == ["first", "finished answer", "second"]
    assert len(rows) == 4 and rows[3].startswith("word0"), "the partial reply is on disk"


def test_ctrl_enter_in_the_message_box_regenerates_instead_of_adding_a_line(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["one", "two"])
    send_and_wait(qtbot, window, "q")
    qtbot.keyClick(window.composer.text, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: path_texts(window) == ["q", "two"], timeout=5000)
    assert window.composer.text.toPlainText() == ""
