"""``ModelSession``: the synchronous model handle the engine thread and the CLI drive."""

from __future__ import annotations

import pytest

from engine.config import ChatMessage, GenerateRequest, LiveOptions, LoadConfig, SamplingConfig
from engine.errors import InvalidRequestError
from engine.events import GenerationFinished
from engine.runtime.session import ModelSession
from tests.helpers.stand_in import stand_in


@pytest.fixture
def session(tiny_checkpoint) -> ModelSession:
    loaded = stand_in(tiny_checkpoint.model, tiny_checkpoint.tokenizer)
    return ModelSession(loaded, LoadConfig(tiny_checkpoint.path, context_length=32), None)  # type: ignore[arg-type]


def test_stats_carry_the_speed_of_the_last_generation(session):
    assert session.stats().tokens_per_second == 0.0
    sampling = SamplingConfig(greedy=True, max_new_tokens=3)
    done = list(session.generate_stream(GenerateRequest(prompt="The quick", sampling=sampling)))[-1]
    assert isinstance(done, GenerationFinished)
    stats = session.stats()
    assert stats.tokens_per_second == done.stats.tokens_per_second > 0
    assert stats.tokens == sum(session.loaded.offload.steps)
    session.reset_stats()
    assert session.stats().tokens == 0 and session.stats().tokens_per_second == 0.0


def test_generation_honours_the_load_context_length(session):
    request = GenerateRequest(prompt="word " * 40, sampling=SamplingConfig(max_new_tokens=4))
    with pytest.raises(InvalidRequestError, match="context"):
        list(session.generate_stream(request))


def test_score_refuses_more_than_the_context_and_empty_text(session):
    with pytest.raises(InvalidRequestError, match="exceed the context length 32"):
        session.score(list(range(5, 45)))
    with pytest.raises(InvalidRequestError, match="empty"):
        session.encode("   ")
    assert session.score(session.encode("The quick brown fox")).nll.numel() > 0


def test_render_chat_and_raw_prompt(session):
    chat = GenerateRequest(messages=(ChatMessage("user", "Hi"),))
    assert session.render_chat(chat) == "<|user|>Hi<|end|><|assistant|>"
    assert session.render_chat(GenerateRequest(prompt="plain")) == "plain"


def test_live_options_reach_the_controller_and_the_config(session):
    live = LiveOptions(policy="smoe", alpha=0.2)
    session.set_live_options(live)
    assert session.loaded.offload.live == live and session.config.live == live


def test_close_releases_the_offload(session):
    offload = session.loaded.offload
    session.close()
    assert offload.closed and session.loaded is None
