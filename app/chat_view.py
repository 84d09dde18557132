"""The transcript: the active branch of a chat rendered as HTML in a QTextBrowser.

Messages are blocks in the manner of chat apps: a role line with small actions, the user's
words in a tinted block, the reply as plain text. The column is at most ``MAX_LINE_PX`` wide
and centred, so lines stay readable in a wide window. Each message has links to copy it, edit
it (user) or regenerate it (assistant), and to step between branches; each code block has its
own Copy link. While a reply streams, repaints are coalesced to at most one per
``RENDER_INTERVAL_MS`` and the view follows the stream only while the user is scrolled to the
bottom. Until a reply's first token arrives (reading a long prompt on a CPU can take a
minute), its block counts the seconds waited, so the app does not look hung.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import QGuiApplication, QResizeEvent
from PySide6.QtWidgets import QFrame, QTextBrowser, QWidget

from app import markdown_render
from app.conversation import Conversation, Message
from app.markdown_render import CodeBlock, Palette

RENDER_INTERVAL_MS = 40
WAIT_TICK_MS = 1000  # the "Reading your message… N s" count before the first token
ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}
MAX_LINE_PX = 760  # about 90 characters of body text: a readable line
SIDE_PX = 16  # the least room left and right of the column


@dataclass(frozen=True)
class Look:
    """Colours of the transcript's own blocks, for one theme."""

    user_block: str
    muted: str
    note: str
    error: str


LOOKS = {
    "light": Look(user_block="#eef2f7", muted="#6b7280", note="#9a5b00", error="#b42318"),
    "dark": Look(user_block="#2c323a", muted="#9aa3ad", note="#e0a44a", error="#ff8a80"),
}


class ChatView(QTextBrowser):
    edit_requested = Signal(str)  # message id
    regenerate_requested = Signal(str)  # message id
    branch_requested = Signal(str, int)  # message id, step (-1 or +1)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.anchorClicked.connect(self._on_anchor)
        self.conversation: Conversation | None = None
        self.palette_html: Palette = markdown_render.LIGHT
        self.streaming_id: str | None = None
        self.stopping = False  # Stop was asked for; the streaming reply ends at the next token
        self.failure = ""  # the last reply's error, shown under the chat until the next one
        self.render_count = 0
        self._cache: dict[str, tuple[str, str, tuple[CodeBlock, ...]]] = {}
        self._code: dict[str, tuple[CodeBlock, ...]] = {}
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(RENDER_INTERVAL_MS)
        self._timer.timeout.connect(self.render_now)
        self.stream_started = 0.0  # time.monotonic() when the streaming reply was asked for
        self._wait_timer = QTimer(self)
        self._wait_timer.setInterval(WAIT_TICK_MS)
        self._wait_timer.timeout.connect(self._wait_tick)

    def start_stream(self, message_id: str) -> None:
        """A reply starts streaming into ``message_id``: count the wait until its first token."""
        self.streaming_id, self.stopping = message_id, False
        self.stream_started = time.monotonic()
        self._wait_timer.start()
        self.render_now()

    def end_stream(self) -> None:
        self.streaming_id = None
        self._wait_timer.stop()
        self.render_now()

    def waiting(self) -> bool:
        """A reply is streaming and no token of it has arrived yet."""
        if self.streaming_id is None or self.conversation is None:
            return False
        message = self.conversation.messages.get(self.streaming_id)
        return message is not None and not message.content

    def waiting_text(self) -> str:
        """The engine reads the whole prompt in one step and checks Stop after it: say so."""
        seconds = int(time.monotonic() - self.stream_started)
        if self.stopping:
            return f"*Stopping once your message is read… {seconds} s*"
        return f"*Reading your message… {seconds} s*"

    def _wait_tick(self) -> None:
        if not self.waiting():
            self._wait_timer.stop()  # the first token came (its own render shows it)
            return
        self.render_now()

    def set_conversation(self, conversation: Conversation | None) -> None:
        self.conversation = conversation
        self.streaming_id = None
        self._wait_timer.stop()
        self.failure = ""
        self.render_now()
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())  # latest first

    @property
    def look(self) -> Look:
        return LOOKS["dark" if self.palette_html is markdown_render.DARK else "light"]

    def side_margin(self) -> int:
        """Left/right margin that keeps the column at most ``MAX_LINE_PX`` wide, centred."""
        return max(SIDE_PX, (self.viewport().width() - MAX_LINE_PX) // 2)

    def _apply_margins(self) -> None:
        root = self.document().rootFrame()
        frame = root.frameFormat()
        margin = self.side_margin()
        if frame.leftMargin() != margin:
            frame.setLeftMargin(margin)
            frame.setRightMargin(margin)
            frame.setTopMargin(12)
            frame.setBottomMargin(24)
            root.setFrameFormat(frame)

    def resizeEvent(self, event: QResizeEvent) -> None:
        follow = self.at_bottom()  # e.g. a banner appeared above: keep the latest in view
        super().resizeEvent(event)
        self._apply_margins()
        if follow:
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

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
        self._apply_margins()
        bar.setValue(bar.maximum() if follow else position)
        self.render_count += 1

    def _document_html(self) -> str:
        if self.conversation is None or not self.conversation.active_path():
            return self._empty_html()
        body = "".join(self._message_html(m) for m in self.conversation.active_path())
        return body + self._failure_html()

    def _empty_html(self) -> str:
        muted = self.look.muted
        return (
            '<p align="center" style="margin-top: 120px; font-size: x-large;">'
            "<b>What can I help with?</b></p>"
            f'<p align="center" style="color: {muted};">Replies are generated on this '
            "computer; nothing leaves it. Enter sends, Shift+Enter adds a line.</p>"
        )

    def _failure_html(self) -> str:
        if not self.failure:
            return ""
        color = self.look.error
        return f'<p style="color: {color}; margin-top: 12px;">{html.escape(self.failure)}</p>'

    def _message_html(self, message: Message) -> str:
        body, blocks = self._body(message)
        self._code[message.id] = blocks
        note = (
            f'<p style="color: {self.look.note}; margin: 0 0 6px 0;">'
            f"<i>{html.escape(message.note)}</i></p>"
            if message.note
            else ""
        )
        if message.role == "user":
            body = (
                f'<table width="100%" cellpadding="10" cellspacing="0" '
                f'bgcolor="{self.look.user_block}"><tr><td>{body}</td></tr></table>'
            )
        return f"{self._header(message)}{note}<div>{body}</div>"

    def _body(self, message: Message) -> tuple[str, tuple[CodeBlock, ...]]:
        text = message.content or (self.waiting_text() if message.id == self.streaming_id else "")
        cached = self._cache.get(message.id)
        if cached is not None and cached[0] == text:
            return cached[1], cached[2]
        rendered = markdown_render.render(text, self.palette_html, f"copy-code:{message.id}:")
        self._cache[message.id] = (text, rendered.html, rendered.code_blocks)
        return rendered.html, rendered.code_blocks

    def _header(self, message: Message) -> str:
        """The role line: who, branch arrows, then small muted actions."""
        muted = self.look.muted
        links = [f'<a href="copy-msg:{message.id}" style="color: {muted};">Copy</a>']
        if message.id != self.streaming_id:
            if message.role == "user":
                links.append(f'<a href="edit:{message.id}" style="color: {muted};">Edit</a>')
            if message.role == "assistant":
                links.append(f'<a href="regen:{message.id}" style="color: {muted};">Regenerate</a>')
        label = f"<b>{ROLE_LABELS[message.role]}</b>"
        if message.id == self.streaming_id:
            state = "stopping…" if self.stopping else "writing…"
            label += f' <span style="color: {muted};">{state}</span>'
        actions = f'<span style="font-size: small;">{" &nbsp;·&nbsp; ".join(links)}</span>'
        return (
            f'<p style="margin: 22px 0 6px 0;">{label}{self._branch_html(message)}'
            f" &nbsp;&nbsp; {actions}</p>"
        )

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
