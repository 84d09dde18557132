"""Chat logic between the widgets, the conversation tree, the store and the engine.

Send, Stop, Regenerate, Edit and branch switching live here so the main window stays thin.
Replies stream from ``EngineBridge.generate`` on the qasync loop. A reply is committed to the
store with its first token and then at most every ``SAVE_INTERVAL_S`` while it streams, so a
killed app keeps the partial reply (shown as interrupted when the chat is opened again);
Stop and closing the window keep it too, marked. A generation that fails before its first
token leaves no message behind: the error is shown and Regenerate (or Retry) answers the
user's message again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal

from app.bridge import EngineBridge, JobEvents
from app.chat_store import ChatStore, ChatStoreError
from app.chat_view import ChatView
from app.conversation import Conversation, Message, title_from
from app.tasks import start_task
from engine.config import GenerateRequest, SamplingConfig
from engine.errors import CancelledError, EngineError
from engine.events import GenerationFinished, TokenReceived

log = logging.getLogger(__name__)
WAIT_FOR_LOADING = "No model is loaded yet; wait for loading to finish."
SAVE_INTERVAL_S = 1.0
INTERRUPTED = "Interrupted: Understudy stopped before this reply finished."
CLOSED = "Stopped: the window was closed during this reply."


@dataclass(frozen=True)
class RequestOptions:
    sampling: SamplingConfig
    chat_template: str | None
    context_length: int


@dataclass
class StreamTiming:
    """Live speed of the reply being generated, for the panel."""

    started: float = 0.0
    first_token: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.first_token if self.first_token else 0.0
        return (self.tokens - 1) / elapsed if self.tokens > 1 and elapsed > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.started if self.first_token else 0.0


def ending_note(finished: GenerationFinished | None, options: RequestOptions) -> str:
    """The note shown above a reply: context overflow, stop or length limit."""
    notes = []
    if finished is not None and finished.dropped_messages:
        count = finished.dropped_messages
        notes.append(
            f"The {count} oldest message{'s' if count > 1 else ''} did not fit in the context "
            f"window ({options.context_length} tokens) and {'were' if count > 1 else 'was'} "
            "left out of this reply."
        )
    if finished is not None and finished.reason == "cancelled":
        notes.append("Stopped.")
    if finished is not None and finished.reason == "length":
        notes.append(f"Reached the reply limit of {options.sampling.max_new_tokens} tokens.")
    return " ".join(notes)


class ChatController(QObject):
    generation_started = Signal()
    token_streamed = Signal()
    generation_finished = Signal(object)  # GenerationFinished | None
    error_occurred = Signal(str)
    generation_failed = Signal(str)  # the message; nothing was kept of the reply
    conversations_changed = Signal()

    def __init__(
        self, store: ChatStore, view: ChatView, options: Callable[[], RequestOptions]
    ) -> None:
        super().__init__()
        self.store = store
        self.view = view
        self.options = options
        self.bridge: EngineBridge | None = None
        self.ready = False
        self.not_ready_reason = WAIT_FOR_LOADING  # what Send says while ``ready`` is False
        self.conversation: Conversation | None = None
        self.timing = StreamTiming()
        self.task: asyncio.Task[None] | None = None
        self._events: JobEvents | None = None
        self._reply_id: str | None = None  # the reply streaming now
        self._saved_at = 0.0
        view.regenerate_requested.connect(self.regenerate)
        view.branch_requested.connect(self.step_branch)

    @property
    def generating(self) -> bool:
        return self.task is not None and not self.task.done()

    def new_conversation(self, system_prompt: str) -> Conversation:
        self.conversation = Conversation(system_prompt=system_prompt)
        self.store.save_conversation(self.conversation)
        self.view.set_conversation(self.conversation)
        self.conversations_changed.emit()
        return self.conversation

    def open(self, conversation_id: str) -> None:
        self.conversation = self.store.load(conversation_id)
        self._mark_interrupted(self.conversation)
        self.view.set_conversation(self.conversation)

    def _mark_interrupted(self, conversation: Conversation) -> None:
        """Replies left unfinished by a killed app: keep them, say so."""
        for message in list(conversation.messages.values()):
            if not message.finished:
                note = " ".join(n for n in (message.note, INTERRUPTED) if n)
                saved = conversation.update(message.id, note=note, finished=True)
                self.store.save_message(conversation, saved)

    def set_system_prompt(self, text: str) -> None:
        if self.conversation is not None:
            self.conversation.system_prompt = text
            self.store.save_conversation(self.conversation)

    def _can_generate(self) -> bool:
        if self.generating:
            self.error_occurred.emit("Wait for the current reply to finish, or press Stop.")
            return False
        if self.bridge is None or not self.ready:
            self.error_occurred.emit(self.not_ready_reason)
            return False
        return True

    def send(self, text: str) -> bool:
        """Add a user message and stream the reply. False when nothing was sent."""
        if not self._can_generate():
            return False
        try:
            conversation = self.conversation or self.new_conversation("")
            message = self._append_saved(conversation, text)
        except ChatStoreError as error:  # the caller puts the typed text back in the box
            self.error_occurred.emit(str(error))
            return False
        self._start(message.id)
        return True

    def _append_saved(self, conversation: Conversation, text: str) -> Message:
        """Append and save a user message; if saving fails, the chat is as it was."""
        before = (dict(conversation.messages), dict(conversation.selected), conversation.title)
        if conversation.title == "New chat":
            conversation.title = title_from(text)
        message = conversation.append("user", text)
        try:
            self.store.save_message(conversation, message)
        except ChatStoreError:
            conversation.messages, conversation.selected, conversation.title = before
            raise
        if conversation.title != before[2]:
            self.conversations_changed.emit()
        return message

    def edit(self, message_id: str, text: str) -> bool:
        """Replace a user message by a new branch and answer it; the old branch stays."""
        if self.conversation is None or not self._can_generate():
            return False
        message = self.conversation.edit(message_id, text)
        self.store.save_message(self.conversation, message)
        self._start(message.id)
        return True

    def regenerate(self, message_id: str = "") -> bool:
        """A new reply next to ``message_id`` (default: the last reply on the active path)."""
        if self.conversation is None or not self._can_generate():
            return False
        unanswered = self._unanswered_id() if not message_id else None
        if unanswered is not None:  # e.g. the last reply failed: answer the question again
            self._start(unanswered)
            return True
        target = message_id or self._last_reply_id()
        if target is None:
            self.error_occurred.emit("There is no reply to regenerate yet.")
            return False
        parent_id = self.conversation.regenerate_parent(target)
        if parent_id is None:
            return False
        self._start(parent_id)
        return True

    def _unanswered_id(self) -> str | None:
        assert self.conversation is not None, "regenerate needs a chat"
        path = self.conversation.active_path()
        return path[-1].id if path and path[-1].role == "user" else None

    def _last_reply_id(self) -> str | None:
        assert self.conversation is not None, "regenerate needs a chat"
        replies = [m for m in self.conversation.active_path() if m.role == "assistant"]
        return replies[-1].id if replies else None

    def step_branch(self, message_id: str, step: int) -> None:
        if self.conversation is None or self.generating:
            return
        self.conversation.step_branch(message_id, step)
        self.store.save_conversation(self.conversation)
        self.view.render_now()

    def stop(self) -> None:
        if self._events is not None and self._events.job is not None:
            self._events.job.cancel()
            self.view.stopping = True
            self.view.render_now()

    def close(self) -> None:
        """The window is closing: stop, and commit the partial reply now, marked."""
        self.stop()
        conversation, reply_id = self.conversation, self._reply_id
        if conversation is None or reply_id is None or reply_id not in conversation.messages:
            return
        current = conversation.messages[reply_id]
        note = " ".join(n for n in (current.note, CLOSED) if n)
        saved = conversation.update(reply_id, note=note, finished=True)
        self.store.save_message(conversation, saved)

    def _start(self, parent_id: str) -> None:
        assert self.bridge is not None, "checked in _can_generate"
        self.task = start_task(self.view, self._reply(parent_id), self.bridge.loop)

    async def _reply(self, parent_id: str) -> None:
        conversation, bridge, options = self.conversation, self.bridge, self.options()
        assert conversation is not None and bridge is not None, "checked in _can_generate"
        request = GenerateRequest(
            messages=conversation.chat_messages(upto=parent_id),
            sampling=options.sampling,
            chat_template=options.chat_template,
        )
        reply = conversation.add_child(parent_id, "assistant", "", finished=False)
        self._reply_id, self._saved_at = reply.id, 0.0
        self.view.failure = ""
        self.view.start_stream(reply.id)
        self.timing = StreamTiming(started=time.perf_counter())
        self.generation_started.emit()
        finished = await self._stream(bridge, request, reply)
        self._finish(conversation, reply, finished, options)

    async def _stream(
        self, bridge: EngineBridge, request: GenerateRequest, reply: Message
    ) -> GenerationFinished | None:
        assert self.conversation is not None, "streaming needs a chat"
        self._events = bridge.generate(request)
        finished, text = None, ""
        try:
            async for event in self._events:
                if isinstance(event, TokenReceived):
                    text += event.text
                    self._count_token()
                    self._save_partial(self.conversation.update(reply.id, content=text))
                    self.view.schedule_render()
                elif isinstance(event, GenerationFinished):
                    finished = event
        except CancelledError:
            log.info("generation cancelled before it started")
        except EngineError as error:
            log.warning("generation failed: %s", error)
            self._failed(reply, f"Generation failed: {error}")
        except Exception as error:
            log.exception("generation failed unexpectedly")
            self._failed(reply, f"Generation failed unexpectedly: {error!r} (see the log file)")
        return finished

    def _save_partial(self, reply: Message) -> None:
        """Commit the streaming reply: at its first token, then every ``SAVE_INTERVAL_S``."""
        now = time.monotonic()
        if self.conversation is not None and now - self._saved_at >= SAVE_INTERVAL_S:
            self._saved_at = now
            self.store.save_message(self.conversation, reply)

    def _failed(self, reply: Message, message: str) -> None:
        assert self.conversation is not None, "streaming needs a chat"
        self.conversation.update(reply.id, note=message)
        self.view.failure = message
        self.generation_failed.emit(message)

    def _count_token(self) -> None:
        now = time.perf_counter()
        self.timing.first_token = self.timing.first_token or now
        self.timing.tokens += 1
        self.token_streamed.emit()

    def _finish(
        self,
        conversation: Conversation,
        reply: Message,
        finished: GenerationFinished | None,
        options: RequestOptions,
    ) -> None:
        current = conversation.messages[reply.id]
        note = " ".join(n for n in (current.note, ending_note(finished, options)) if n)
        content = finished.text if finished is not None else current.content
        try:
            if finished is None and not content:
                conversation.remove(reply.id)  # failed before any text: no branch is left behind
                self.store.save_conversation(conversation)
            else:
                saved = conversation.update(reply.id, content=content, note=note, finished=True)
                self.store.save_message(conversation, saved)
        except ChatStoreError as error:  # the reply stays on screen; say it is not saved
            self.error_occurred.emit(f"{error} The reply is still shown.")
        self._events, self._reply_id = None, None
        self.view.end_stream()
        self.generation_finished.emit(finished)
