"""Chat logic between the widgets, the conversation tree, the store and the engine.

Send, Stop, Regenerate, Edit and branch switching live here so the main window stays thin.
Replies stream from ``EngineBridge.generate`` on the qasync loop; each finished message is
committed to the store at once.
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
from engine.errors import EngineError
from engine.events import GenerationFinished, TokenReceived

log = logging.getLogger(__name__)


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
        self.conversation: Conversation | None = None
        self.timing = StreamTiming()
        self.task: asyncio.Task[None] | None = None
        self._events: JobEvents | None = None
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
        self.view.set_conversation(self.conversation)

    def set_system_prompt(self, text: str) -> None:
        if self.conversation is not None:
            self.conversation.system_prompt = text
            self.store.save_conversation(self.conversation)

    def _can_generate(self) -> bool:
        if self.generating:
            self.error_occurred.emit("Wait for the current reply to finish, or press Stop.")
            return False
        if self.bridge is None or not self.ready:
            self.error_occurred.emit("No model is loaded yet; wait for loading to finish.")
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
        target = message_id or self._last_reply_id()
        if target is None:
            self.error_occurred.emit("There is no reply to regenerate yet.")
            return False
        parent_id = self.conversation.regenerate_parent(target)
        if parent_id is None:
            return False
        self._start(parent_id)
        return True

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
        self.view.streaming_id = reply.id
        self.view.render_now()
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
                    self.conversation.update(reply.id, content=text)
                    self.view.schedule_render()
                elif isinstance(event, GenerationFinished):
                    finished = event
        except EngineError as error:
            log.warning("generation failed: %s", error)
            self._failed(reply, f"Generation failed: {error}")
        except Exception as error:
            log.exception("generation failed unexpectedly")
            self._failed(reply, f"Generation failed unexpectedly: {error!r} (see the log file)")
        return finished

    def _failed(self, reply: Message, message: str) -> None:
        assert self.conversation is not None, "streaming needs a chat"
        self.conversation.update(reply.id, note=message)
        self.error_occurred.emit(message)

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
        saved = conversation.update(reply.id, content=content, note=note, finished=True)
        try:
            self.store.save_message(conversation, saved)
        except ChatStoreError as error:  # the reply stays on screen; say it is not saved
            self.error_occurred.emit(f"{error} The reply is still shown.")
        self._events = None
        self.view.streaming_id = None
        self.view.render_now()
        self.generation_finished.emit(finished)
