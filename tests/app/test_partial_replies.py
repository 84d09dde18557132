"""A reply that does not finish is kept, marked: stopped, killed mid-reply (found unfinished at
the next start) or cut by closing the window. A generation that fails before its first token
leaves no branch behind; Retry answers the question again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.chat_controller import CLOSED, INTERRUPTED
from app.chat_store import ChatStore
from app.main_window import MainWindow
from engine.errors import InvalidRequestError
from tests.app.fake_engine import FakeEngine

LONG = " ".join(f"word{i}" for i in range(400))


def start_long_reply(qtbot: Any, window: MainWindow, fake_engine: FakeEngine) -> None:
    fake_engine.replies = iter([LONG, "short answer"])
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("tell me a long story")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens > 5, timeout=5000)


def stored_reply(user_dirs: Path, conversation_id: str) -> Any:
    store = ChatStore(user_dirs / "data" / "chats.sqlite3")
    try:
        path = store.load(conversation_id).active_path()
    finally:
        store.close()
    return path


def test_stop_keeps_the_partial_reply_marked(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    start_long_reply(qtbot, window, fake_engine)
    window.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    conversation = window.controller.conversation
    assert conversation is not None
    path = stored_reply(user_dirs, conversation.id)
    assert [m.role for m in path] == ["user", "assistant"]
    assert path[-1].content.startswith("word0 word1") and path[-1].note == "Stopped."


def test_a_killed_app_leaves_the_partial_reply_saved_and_marked_interrupted(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    window = make_window()
    start_long_reply(qtbot, window, fake_engine)
    conversation = window.controller.conversation
    assert conversation is not None
    # a kill: the process ends here; only what was committed so far is in the database
    path = stored_reply(user_dirs, conversation.id)
    assert [m.role for m in path] == ["user", "assistant"], "no dangling user message"
    assert path[-1].content.startswith("word0") and not path[-1].finished
    window.controller.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    store = ChatStore(user_dirs / "data" / "chats.sqlite3")
    store.save_message(conversation, path[-1])  # back to the state a kill left
    store.close()
    again = make_window()
    again.open_conversation(conversation.id)
    reply = again.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
    assert reply.note == INTERRUPTED and reply.finished and reply.content.startswith("word0")
    assert "Interrupted" in again.chat_view.toPlainText()


def test_closing_the_window_mid_reply_keeps_the_partial_reply(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    window = make_window()
    start_long_reply(qtbot, window, fake_engine)
    conversation = window.controller.conversation
    assert conversation is not None
    window.close()
    path = stored_reply(user_dirs, conversation.id)
    assert path[-1].role == "assistant" and path[-1].content.startswith("word0")
    assert CLOSED in path[-1].note and path[-1].finished, "not reported again as interrupted"


def test_a_reply_ending_after_the_window_and_store_closed_touches_nothing(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    """Under load the engine's 'finished' can arrive after closing, once the store is closed."""
    window = make_window()
    start_long_reply(qtbot, window, fake_engine)
    window.close()
    window.chat_store.close()
    window._generation_finished(None)  # raised 'Cannot operate on a closed database' before
    assert window.composer.send_button.isEnabled()


def test_a_failed_generation_leaves_no_branch_and_retry_answers(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    fake_engine.fail_generate = InvalidRequestError("max new tokens (512) must be below 512")
    window.composer.text.setPlainText("hi")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    conversation = window.controller.conversation
    assert conversation is not None
    assert [m.role for m in conversation.messages.values()] == ["user"], "no failed branch"
    assert [m.role for m in stored_reply(user_dirs, conversation.id)] == ["user"]
    assert "must be below 512" in window.banner.text
    assert "Generation failed" in window.chat_view.toPlainText()
    retry = next(b for b in window.banner.buttons if b.text() == "Retry")
    fake_engine.fail_generate = None
    retry.click()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    path = conversation.active_path()
    assert [m.role for m in path] == ["user", "assistant"] and path[-1].content
    assert len(conversation.siblings(path[-1].id)) == 1
    assert "Generation failed" not in window.chat_view.toPlainText()


def test_stop_says_stopping_until_the_engine_ends_the_reply(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    """On a slow CPU the engine stops after the token it computes (seconds): the Stop button
    and the reply say so at once instead of looking as if the click did nothing."""
    fake_engine.replies = iter([LONG])
    fake_engine.token_delay = 0.3  # a slow token: the stop lands within it
    window.composer.text.setPlainText("tell me a long story")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens >= 1, timeout=5000)
    window.stop()
    button = window.composer.stop_button
    assert button.text() == "Stopping…" and not button.isEnabled()
    assert "stopping…" in window.chat_view.toPlainText()
    assert "writing…" not in window.chat_view.toPlainText()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert button.text() == "Stop" and not button.isEnabled()
    assert "stopping…" not in window.chat_view.toPlainText()
