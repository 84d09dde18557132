"""The conversation tree: Edit and Regenerate add branches, nothing is erased."""

from __future__ import annotations

import pytest

from app.conversation import Conversation, title_from


def chat_with_reply() -> tuple[Conversation, str, str]:
    chat = Conversation(system_prompt="Be brief.")
    user = chat.append("user", "What is MoE?")
    reply = chat.append("assistant", "Mixture of experts.")
    return chat, user.id, reply.id


def test_append_builds_the_active_path_in_order() -> None:
    chat, user_id, reply_id = chat_with_reply()
    assert [m.id for m in chat.active_path()] == [user_id, reply_id]
    assert chat.messages[reply_id].parent_id == user_id


def test_edit_adds_a_sibling_branch_and_keeps_the_old_one() -> None:
    chat, user_id, reply_id = chat_with_reply()
    edited = chat.edit(user_id, "What is a mixture of experts?")
    assert edited.parent_id is None
    assert [m.id for m in chat.active_path()] == [edited.id], "the new branch is shown"
    assert user_id in chat.messages and reply_id in chat.messages, "nothing erased"
    assert [m.id for m in chat.siblings(edited.id)] == [user_id, edited.id]
    chat.step_branch(edited.id, -1)
    assert [m.id for m in chat.active_path()] == [user_id, reply_id], "old branch comes back"


def test_regenerate_adds_a_second_reply_under_the_same_user_message() -> None:
    chat, user_id, reply_id = chat_with_reply()
    parent = chat.regenerate_parent(reply_id)
    second = chat.add_child(parent, "assistant", "Experts picked by a router.")
    assert parent == user_id
    assert [m.id for m in chat.siblings(second.id)] == [reply_id, second.id]
    assert chat.active_path()[-1].id == second.id
    assert chat.step_branch(second.id, +1) == second.id, "stepping past the end stays put"


def test_chat_messages_start_with_the_system_prompt_and_stop_at_upto() -> None:
    chat, user_id, _ = chat_with_reply()
    messages = chat.chat_messages(upto=user_id)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."),
        ("user", "What is MoE?"),
    ]


def test_edit_refuses_an_assistant_message_and_unknown_ids() -> None:
    chat, _, reply_id = chat_with_reply()
    with pytest.raises(ValueError, match="assistant message, not user"):
        chat.edit(reply_id, "x")
    with pytest.raises(KeyError, match="no message"):
        chat.edit("missing", "x")


def test_title_from_shortens_long_first_messages() -> None:
    assert title_from("  hello\n world ") == "hello world"
    long = title_from("word " * 30)
    assert len(long) == 40 and long.endswith("…")
