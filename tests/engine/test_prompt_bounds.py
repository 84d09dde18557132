"""The work a hostile prompt or chat template can cause is bounded: a template that loops is
stopped with a message, text far longer than the context is refused before tokenising."""

from __future__ import annotations

import time
from typing import Any

import pytest

from engine.config import ChatMessage, GenerateRequest, SamplingConfig
from engine.errors import InvalidRequestError
from engine.runtime import prompts
from engine.runtime.prompts import prepare_prompt, render_chat
from tests.helpers.tiny_models import build_tiny_tokenizer

LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def test_a_looping_chat_template_is_stopped_with_a_message(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompts, "TEMPLATE_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"ran for more than 0\.3 s and was stopped"):
        render_chat(tokenizer, [ChatMessage("user", "hi")], LOOPING)
    assert time.monotonic() - started < 30, "stopped, not run to the end (hours)"
    assert render_chat(tokenizer, [ChatMessage("user", "hi")], "{{ messages[0]['content'] }}") == (
        "hi"
    )


class CountingTokenizer:
    """Counts the characters it was asked to tokenise."""

    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __init__(self, inner: Any) -> None:
        self.inner, self.characters = inner, 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.characters += len(text)
        return self.inner(text, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.apply_chat_template(*args, **kwargs)


def test_a_huge_prompt_is_refused_before_it_is_tokenised(tokenizer: Any) -> None:
    counting = CountingTokenizer(tokenizer)
    sampling = SamplingConfig(max_new_tokens=16)
    huge = GenerateRequest(prompt="word " * 200_000, sampling=sampling)
    with pytest.raises(InvalidRequestError, match="far more than the 48 tokens"):
        prepare_prompt(counting, huge, 64)
    assert counting.characters == 0


def test_a_huge_chat_history_is_cut_before_rendering(tokenizer: Any) -> None:
    counting = CountingTokenizer(tokenizer)
    old = [ChatMessage("user", "old " * 50_000), ChatMessage("assistant", "ok")]
    request = GenerateRequest(
        messages=(*old, ChatMessage("user", "hi")), sampling=SamplingConfig(max_new_tokens=16)
    )
    prepared = prepare_prompt(counting, request, 64)
    assert prepared.dropped_messages == 2
    assert counting.characters < 10_000, "the old turns were never tokenised"
