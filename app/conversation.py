"""A chat as a tree of messages: Edit and Regenerate add branches, nothing is erased.

Each message has a parent (``None`` for the first turn). For each parent the conversation
remembers which child is selected; the *active path* follows those choices from the root to
a leaf, and is what the user sees and what is sent to the model. Pure Python, no Qt.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

from engine.config import ChatMessage

Role = Literal["system", "user", "assistant"]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Message:
    id: str
    parent_id: str | None
    role: Role
    content: str
    created: float = field(default_factory=time.time)
    note: str = ""  # shown above the message (e.g. "2 oldest messages left out")
    finished: bool = True


@dataclass
class Conversation:
    id: str = field(default_factory=new_id)
    title: str = "New chat"
    system_prompt: str = ""
    created: float = field(default_factory=time.time)
    messages: dict[str, Message] = field(default_factory=dict)
    selected: dict[str | None, str] = field(default_factory=dict)  # parent id -> chosen child

    def children(self, parent_id: str | None) -> list[Message]:
        found = [m for m in self.messages.values() if m.parent_id == parent_id]
        return sorted(found, key=lambda m: m.created)

    def active_path(self) -> list[Message]:
        path: list[Message] = []
        parent: str | None = None
        while True:
            kids = self.children(parent)
            if not kids:
                return path
            chosen = self.messages.get(self.selected.get(parent, ""), kids[-1])
            path.append(chosen)
            parent = chosen.id

    def leaf_id(self) -> str | None:
        path = self.active_path()
        return path[-1].id if path else None

    def add(self, message: Message) -> Message:
        """Insert a message (from the store or new) and select it under its parent."""
        self.messages[message.id] = message
        self.selected[message.parent_id] = message.id
        return message

    def append(self, role: Role, content: str, finished: bool = True) -> Message:
        """Add a message at the end of the active path."""
        return self.add_child(self.leaf_id(), role, content, finished)

    def update(self, message_id: str, **changes: object) -> Message:
        message = replace(self.messages[message_id], **changes)  # type: ignore[arg-type]
        self.messages[message_id] = message
        return message

    def remove(self, message_id: str) -> None:
        """Drop a message that has no children (a reply that failed); select its sibling."""
        message = self.messages[message_id]
        assert not self.children(message_id), "only a leaf message can be removed"
        del self.messages[message_id]
        siblings = self.children(message.parent_id)
        if siblings:
            self.selected[message.parent_id] = siblings[-1].id
        else:
            self.selected.pop(message.parent_id, None)

    def edit(self, message_id: str, content: str) -> Message:
        """A user message edited: a new sibling branch; the old one is kept."""
        old = self._get(message_id, "user")
        return self.add(Message(new_id(), old.parent_id, "user", content))

    def regenerate_parent(self, message_id: str) -> str | None:
        """Where a regenerated reply goes: the parent of the assistant message given."""
        old = self._get(message_id, "assistant")
        self.selected[old.parent_id] = old.id
        return old.parent_id

    def siblings(self, message_id: str) -> list[Message]:
        return self.children(self.messages[message_id].parent_id)

    def select(self, message_id: str) -> None:
        """Show the branch that goes through ``message_id``."""
        message = self.messages[message_id]
        self.selected[message.parent_id] = message.id

    def step_branch(self, message_id: str, step: int) -> str:
        """Move to the previous (-1) or next (+1) sibling; return the id now shown."""
        siblings = self.siblings(message_id)
        index = [m.id for m in siblings].index(message_id)
        target = siblings[max(0, min(len(siblings) - 1, index + step))]
        self.select(target.id)
        return target.id

    def add_child(
        self, parent_id: str | None, role: Role, content: str, finished: bool = True
    ) -> Message:
        """Add a message under ``parent_id`` (a new branch when it already has children)."""
        return self.add(Message(new_id(), parent_id, role, content, finished=finished))

    def chat_messages(self, upto: str | None = None) -> tuple[ChatMessage, ...]:
        """The active path (up to and including ``upto``) as engine chat messages."""
        result: list[ChatMessage] = []
        if self.system_prompt.strip():
            result.append(ChatMessage("system", self.system_prompt))
        for message in self.active_path():
            if message.content.strip():
                result.append(ChatMessage(message.role, message.content))
            if message.id == upto:
                break
        return tuple(result)

    def _get(self, message_id: str, role: Role) -> Message:
        message = self.messages.get(message_id)
        if message is None:
            raise KeyError(f"no message {message_id!r} in this chat")
        if message.role != role:
            raise ValueError(f"message {message_id!r} is a {message.role} message, not {role}")
        return message


def title_from(text: str, limit: int = 40) -> str:
    """A chat title from its first user message."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
