"""The transcript: the active branch of a chat rendered as HTML in a QTextBrowser.

Each message has links to copy it, edit it (user) or regenerate it (assistant), and to step
between branches; each code block has its own Copy link. While a reply streams, repaints
are coalesced to at most one per ``RENDER_INTERVAL_MS`` and the view follows the stream only
while the user is scrolled to the bottom.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QTextBrowser, QWidget

from app import markdown_render
from app.conversation import Conversation, Message
from app.markdown_render import CodeBlock, Palette

RENDER_INTERVAL_MS = 40
ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}


class ChatView(QTextBrowser):
    edit_requested = Signal(str)  # message id
    regenerate_requested = Signal(str)  # message id
    branch_requested = Signal(str, int)  # message id, step (-1 or +1)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self.conversation: Conversation | None = None
        self.palette_html: Palette = markdown_render.LIGHT
        self.streaming_id: str | None = None
        self.failure = ""  # the last reply's error, shown under the chat until the next one
        self.render_count = 0
        self._cache: dict[str, tuple[str, str, tuple[CodeBlock, ...]]] = {}
        self._code: dict[str, tuple[CodeBlock, ...]] = {}
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(RENDER_INTERVAL_MS)
        self._timer.timeout.connect(self.render_now)

    def set_conversation(self, conversation: Conversation | None) -> None:
        self.conversation = conversation
        self.streaming_id = None
        self.failure = ""
        self.render_now()

    def set_html_palette(self, palette: Palette) -> None:
        self.palette_html = palette
        self._cache.clear()
        self.render_now()

    def schedule_render(self) -> None:
        """Ask for a repaint; several calls within the interval make one."""
        if not self._timer.isActive():
            self._timer.start()

    def at_bottom(self) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - 4

    def render_now(self) -> None:
        self._timer.stop()
        bar = self.verticalScrollBar()
        follow, position = self.at_bottom(), bar.value()
        self.setHtml(self._document_html())
        bar.setValue(bar.maximum() if follow else position)
        self.render_count += 1

    def _document_html(self) -> str:
        if self.conversation is None or not self.conversation.active_path():
            return '<p style="color: gray;">Type a message below to start.</p>'
        body = "".join(self._message_html(m) for m in self.conversation.active_path())
        return body + self._failure_html()

    def _failure_html(self) -> str:
        if not self.failure:
            return ""
        return f'<p style="color: #c0392b;"><i>{html.escape(self.failure)}</i></p>'

    def _message_html(self, message: Message) -> str:
        body, blocks = self._body(message)
        self._code[message.id] = blocks
        note = (
            f'<p style="color: #b26b00;"><i>{html.escape(message.note)}</i></p>'
            if message.note
            else ""
        )
        return f"{self._header(message)}{note}<div>{body}</div><hr/>"

    def _body(self, message: Message) -> tuple[str, tuple[CodeBlock, ...]]:
        text = message.content or ("…" if message.id == self.streaming_id else "")
        cached = self._cache.get(message.id)
        if cached is not None and cached[0] == text:
            return cached[1], cached[2]
        rendered = markdown_render.render(text, self.palette_html, f"copy-code:{message.id}:")
        self._cache[message.id] = (text, rendered.html, rendered.code_blocks)
        return rendered.html, rendered.code_blocks

    def _header(self, message: Message) -> str:
        link = self.palette_html.link
        links = [f'<a href="copy-msg:{message.id}" style="color: {link};">Copy</a>']
        if message.id != self.streaming_id:
            if message.role == "user":
                links.append(f'<a href="edit:{message.id}" style="color: {link};">Edit</a>')
            if message.role == "assistant":
                links.append(f'<a href="regen:{message.id}" style="color: {link};">Regenerate</a>')
        label = f"<b>{ROLE_LABELS[message.role]}</b>"
        if message.id == self.streaming_id:
            label += ' <span style="color: gray;">(writing…)</span>'
        return f"<p>{label}{self._branch_html(message)} &nbsp; {' &middot; '.join(links)}</p>"

    def _branch_html(self, message: Message) -> str:
        assert self.conversation is not None, "rendering needs a conversation"
        siblings = self.conversation.siblings(message.id)
        if len(siblings) < 2:
            return ""
        index = [m.id for m in siblings].index(message.id) + 1
        link = self.palette_html.link
        return (
            f' &nbsp; <a href="prev:{message.id}" style="color: {link};">&lsaquo;</a> '
            f"{index}/{len(siblings)} "
            f'<a href="next:{message.id}" style="color: {link};">&rsaquo;</a>'
        )

    def code_blocks(self, message_id: str) -> tuple[CodeBlock, ...]:
        return self._code.get(message_id, ())

    def _on_anchor(self, url: QUrl) -> None:
        self.follow_link(url.toString())

    def follow_link(self, link: str) -> None:
        """Act on one of the transcript's links (also used by tests)."""
        action, _, target = link.partition(":")
        if action == "copy-msg" and self.conversation is not None:
            QGuiApplication.clipboard().setText(self.conversation.messages[target].content)
        elif action == "copy-code":
            message_id, _, index = target.partition(":")
            QGuiApplication.clipboard().setText(self.code_blocks(message_id)[int(index)].code)
        elif action == "edit":
            self.edit_requested.emit(target)
        elif action == "regen":
            self.regenerate_requested.emit(target)
        elif action in ("prev", "next"):
            self.branch_requested.emit(target, -1 if action == "prev" else 1)
