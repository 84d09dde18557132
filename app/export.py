"""Export a chat to Markdown (the visible branch) or JSON (every branch). No Qt in here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from app import __version__
from app.conversation import Conversation
from engine.atomic import write_text_atomic

ROLE_TITLES = {"user": "User", "assistant": "Assistant", "system": "System"}
UNSAFE_IN_NAMES = re.compile(r'[\x00-\x1f<>:"/\\|?*]+')


def file_name_for(title: str, suffix: str = ".md", limit: int = 80) -> str:
    """A file name from a chat title, safe on Windows, macOS and Linux."""
    name = " ".join(UNSAFE_IN_NAMES.sub(" ", title).split()).strip(" .")[:limit].rstrip(" .")
    return (name or "chat") + suffix


def default_export_path(title: str, folder: Path) -> Path:
    """Where Export suggests saving: the documents folder, named after the chat."""
    return folder / file_name_for(title)


def to_markdown(conversation: Conversation) -> str:
    """The active path as Markdown, one heading per message."""
    lines = [f"# {conversation.title}", ""]
    if conversation.system_prompt.strip():
        lines += ["## System", "", conversation.system_prompt.strip(), ""]
    for message in conversation.active_path():
        lines += [f"## {ROLE_TITLES[message.role]}", ""]
        if message.note:
            lines += [f"> {message.note}", ""]
        lines += [message.content.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json_data(conversation: Conversation) -> dict[str, Any]:
    """Every message with its parent, plus the active path's ids (so branches survive)."""
    messages = sorted(conversation.messages.values(), key=lambda m: m.created)
    return {
        "format": "understudy-chat",
        "version": 1,
        "exported_by": f"Understudy {__version__}",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "id": conversation.id,
        "title": conversation.title,
        "system_prompt": conversation.system_prompt,
        "active_path": [m.id for m in conversation.active_path()],
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,
                "role": m.role,
                "content": m.content,
                "created": m.created,
                "note": m.note,
            }
            for m in messages
        ],
    }


def to_json(conversation: Conversation) -> str:
    return json.dumps(to_json_data(conversation), indent=2, ensure_ascii=False) + "\n"


def export_to(conversation: Conversation, path: Path) -> None:
    """Write Markdown for ``.md`` files and JSON for ``.json`` files."""
    suffix = path.suffix.lower()
    if suffix in (".md", ".markdown"):
        text = to_markdown(conversation)
    elif suffix == ".json":
        text = to_json(conversation)
    else:
        raise ValueError(f"export to .md or .json, not {suffix or 'a file without extension'}")
    write_text_atomic(path, text)  # an interrupted export never leaves half a file
