"""From a ``GenerateRequest`` to prompt token ids that fit the context.

Chat requests go through the tokenizer's own chat template (``apply_chat_template``) or the
request's override template; raw prompts are tokenised as given. When a chat is too long, the
oldest turns (never the system message, never the last user message) are dropped until the
prompt plus ``max_new_tokens`` fits the context length. Nothing here runs the model.

The work a hostile input can cause is bounded: a chat template gets ``TEMPLATE_SECONDS`` to
render (a trace hook stops it), and text far longer than the context could ever hold is
refused, or its oldest turns dropped, before it is tokenised (``MAX_CHARS_PER_TOKEN``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from engine.config import ChatMessage, GenerateRequest
from engine.errors import InvalidRequestError

TEMPLATE_SECONDS = 5.0  # real templates render in milliseconds
MAX_CHARS_PER_TOKEN = 64  # no tokenizer packs more text than this into one token


class TemplateTimeout(Exception):
    """Raised inside a template that ran past its time."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Stop Python code in this thread (a jinja template) after ``seconds`` of running."""
    deadline = time.monotonic() + seconds

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTimeout
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids to prefill, and how many of the oldest chat messages were dropped to fit."""

    ids: tuple[int, ...]
    dropped_messages: int = 0


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], template: str | None) -> str:
    """The chat as the model sees it, ending with the assistant's generation prompt."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model's tokenizer has no chat template: set a template or send a plain prompt."
        )
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        with time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, add_generation_prompt=True
            )
    except TemplateTimeout as error:
        raise InvalidRequestError(
            f"The chat template ran for more than {TEMPLATE_SECONDS:g} s and was stopped: "
            "it loops far too long for a template; fix or replace it."
        ) from error
    except Exception as error:  # jinja2 raises its own TemplateError family
        raise InvalidRequestError(f"The chat template failed: {error}") from error
    return str(text)


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage], template: str | None) -> list[int]:
    """Token ids of a rendered chat; the template already writes any BOS token it wants."""
    text = render_chat(tokenizer, messages, template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _too_long(characters: int, budget: int) -> bool:
    """True when text this long cannot fit ``budget`` tokens with any tokenizer."""
    return characters > budget * MAX_CHARS_PER_TOKEN


def encode_prompt(tokenizer: Any, prompt: str, budget: int | None = None) -> list[int]:
    """Token ids of a raw prompt, with the tokenizer's usual special tokens (e.g. BOS)."""
    if budget is not None and _too_long(len(prompt), budget):
        raise InvalidRequestError(
            f"The prompt is {len(prompt):,} characters, far more than the {budget} tokens that "
            "fit the context next to the reply: shorten it or load with a longer context."
        )
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise InvalidRequestError("The prompt produced no tokens.")
    return ids


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use so that the whole reply still fits the context."""
    budget = context_length - max_new_tokens
    if budget < 1:
        raise InvalidRequestError(
            f"max new tokens ({max_new_tokens}) must be below the context length "
            f"({context_length}); lower it or load with a longer context."
        )
    return budget


def _last_user_index(messages: Sequence[ChatMessage]) -> int:
    return max(i for i, m in enumerate(messages) if m.role == "user")


def drop_oldest_turn(messages: list[ChatMessage]) -> int:
    """Remove the oldest droppable turn in place (a message plus its assistant reply).

    Returns how many messages went; 0 when only the system message and the last user
    message (and what follows it) are left.
    """
    last_user = _last_user_index(messages)
    index = next((i for i in range(last_user) if messages[i].role != "system"), None)
    if index is None:
        return 0
    del messages[index]
    if index < last_user - 1 and messages[index].role == "assistant":
        del messages[index]
        return 2
    return 1


def fit_chat(
    tokenizer: Any, messages: Sequence[ChatMessage], template: str | None, budget: int
) -> PreparedPrompt:
    """Encode the chat, dropping oldest turns until it fits ``budget`` tokens."""
    kept = list(messages)
    dropped = 0
    while _too_long(sum(len(m.content) for m in kept), budget):  # cheap: before any render
        removed = drop_oldest_turn(kept)
        if removed == 0:
            raise InvalidRequestError(
                "The last message is far longer than the context can hold next to the reply: "
                "shorten it, lower max new tokens, or load with a longer context."
            )
        dropped += removed
    while True:
        ids = encode_chat(tokenizer, kept, template)
        if len(ids) <= budget:
            return PreparedPrompt(tuple(ids), dropped)
        removed = drop_oldest_turn(kept)
        if removed == 0:
            raise InvalidRequestError(
                f"The last message needs {len(ids)} tokens with the template, but only {budget} "
                "fit the context next to the reply: shorten it, lower max new tokens, "
                "or load with a longer context."
            )
        dropped += removed


def prepare_prompt(tokenizer: Any, request: GenerateRequest, context_length: int) -> PreparedPrompt:
    """Prompt ids for ``request`` that leave room for ``max_new_tokens`` in the context."""
    budget = prompt_budget(context_length, request.sampling.max_new_tokens)
    if request.prompt is None:
        return fit_chat(tokenizer, request.messages, request.chat_template, budget)
    ids = encode_prompt(tokenizer, request.prompt, budget)
    if len(ids) > budget:
        raise InvalidRequestError(
            f"The prompt is {len(ids)} tokens but only {budget} fit the context next to the "
            "reply: shorten it, lower max new tokens, or load with a longer context."
        )
    return PreparedPrompt(tuple(ids))
