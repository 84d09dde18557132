"""Chat export: Markdown shows the visible branch, JSON keeps every branch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.conversation import Conversation
from app.export import export_to, to_json, to_markdown


def branched_chat() -> Conversation:
    chat = Conversation(title="Offloading", system_prompt="Be exact.")
    user = chat.append("user", "Why offload experts?")
    chat.append("assistant", "Old answer.")
    chat.edit(user.id, "Why offload MoE experts?")
    chat.append("assistant", "```python\nprint('fits')\n```")
    chat.update(chat.leaf_id() or "", note="1 oldest message left out.")
    return chat


def test_markdown_has_the_visible_branch_only() -> None:
    text = to_markdown(branched_chat())
    assert text.startswith("# Offloading\n")
    assert "## System\n\nBe exact." in text
    assert "Why offload MoE experts?" in text and "```python\nprint('fits')\n```" in text
    assert "> 1 oldest message left out." in text
    assert "Old answer." not in text and "Why offload experts?" not in text


def test_json_keeps_every_branch_and_the_active_path() -> None:
    chat = branched_chat()
    data = json.loads(to_json(chat))
    assert data["format"] == "understudy-chat" and data["title"] == "Offloading"
    assert len(data["messages"]) == 4
    assert data["active_path"] == [m.id for m in chat.active_path()]
    by_id = {m["id"]: m for m in data["messages"]}
    assert {by_id[i]["role"] for i in data["active_path"]} == {"user", "assistant"}


def test_export_to_picks_the_format_from_the_suffix(tmp_path: Path) -> None:
    chat = branched_chat()
    export_to(chat, tmp_path / "chat.md")
    export_to(chat, tmp_path / "chat.json")
    assert (tmp_path / "chat.md").read_text().startswith("# Offloading")
    assert json.loads((tmp_path / "chat.json").read_text())["id"] == chat.id
    with pytest.raises(ValueError, match=r"export to \.md or \.json"):
        export_to(chat, tmp_path / "chat.txt")
