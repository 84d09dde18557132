"""The generation loop against the unmodified tiny model: exactness, stops, cancel, chat, score."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from engine.config import ChatMessage, GenerateRequest, SamplingConfig
from engine.errors import CancelledError, InvalidRequestError
from engine.events import FLUSH_TOKEN_ID, GenerationFinished, TokenReceived
from engine.runtime.generation import forward, score_tokens, stream_generation
from engine.runtime.prompts import encode_chat, prepare_prompt, render_chat

GREEDY = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=12)
PROMPT = "The quick brown fox"


def run(loaded, request, context_length=256, **kwargs):
    events = list(stream_generation(loaded, request, context_length, **kwargs))
    assert isinstance(events[-1], GenerationFinished), "the stream ends with GenerationFinished"
    tokens = [e for e in events if isinstance(e, TokenReceived)]
    return tokens, events[-1]


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]


def test_greedy_stream_equals_argmax_of_full_forward(tiny_loaded):
    tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=GREEDY))
    prompt = list(tiny_loaded.tokenizer(PROMPT)["input_ids"])
    assert len(done.token_ids) >= 3, "the tiny model should produce a few tokens"
    for step, token in enumerate(done.token_ids):
        expected = int(
            full_logits(tiny_loaded.model, prompt + list(done.token_ids[:step]))[-1].argmax()
        )
        assert token == expected, f"step {step}: cached greedy token differs from full recompute"
    assert [t.token_id for t in tokens if t.token_id != FLUSH_TOKEN_ID] == list(done.token_ids)


def test_kv_cached_decode_logits_equal_no_cache_recompute(tiny_loaded):
    ids = list(tiny_loaded.tokenizer("Hello, how are you today?")["input_ids"])
    cache = DynamicCache(config=tiny_loaded.model.config)
    cached = [forward(tiny_loaded, ids[:3], cache, last_only=False)]
    cached += [forward(tiny_loaded, [i], cache, last_only=False) for i in ids[3:]]
    torch.testing.assert_close(
        torch.cat(cached), full_logits(tiny_loaded.model, ids), atol=1e-5, rtol=1e-5
    )


def test_offload_told_tokens_after_every_forward(tiny_loaded):
    _tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=GREEDY))
    steps = tiny_loaded.offload.steps
    assert steps[0] == done.prompt_tokens, "prefill reports the prompt length"
    assert steps[1:] == [1] * (len(steps) - 1), "each decode step reports one token"
    assert done.stats.tokens == sum(steps)
    assert done.stats.time_to_first_token_s > 0 and done.stats.tokens_per_second > 0


def test_max_new_tokens_stops_with_length(tiny_loaded):
    sampling = SamplingConfig(greedy=True, max_new_tokens=3)
    _tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    assert done.reason == "length" and len(done.token_ids) == 3


def test_eos_stops_generation(tiny_loaded, monkeypatch):
    eos = tiny_loaded.tokenizer.eos_token_id
    sampling = SamplingConfig(greedy=True, max_new_tokens=5)

    def pick_eos_third(self, logits, previous):
        return eos if len(previous) >= prompt_len + 2 else 7

    prompt_len = len(tiny_loaded.tokenizer(PROMPT)["input_ids"])
    monkeypatch.setattr("engine.runtime.sampling.Sampler.pick", pick_eos_third)
    _tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    assert done.reason == "stop" and done.token_ids == (7, 7), (
        "EOS ends it and is not part of the reply"
    )


SCRIPT = "Hello, how are you today? I am fine, thank you."


@pytest.fixture
def scripted(tiny_loaded, monkeypatch):
    """The sampler replays the tokens of ``SCRIPT`` so stop strings meet known text."""
    script = tiny_loaded.tokenizer(SCRIPT)["input_ids"]
    prompt_len = len(tiny_loaded.tokenizer(PROMPT)["input_ids"])

    def replay(self, logits, previous):
        return script[len(previous) - prompt_len]

    monkeypatch.setattr("engine.runtime.sampling.Sampler.pick", replay)
    return len(script)


def test_stop_string_ends_before_it_and_is_never_streamed(tiny_loaded, scripted):
    sampling = SamplingConfig(max_new_tokens=scripted, stop=("xyz", "u tod"))
    tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    assert done.reason == "stop_string"
    assert done.text == "Hello, how are yo"
    assert "".join(t.text for t in tokens) == done.text, "streamed text equals the final text"
    assert all(t.token_id != FLUSH_TOKEN_ID for t in tokens)


def test_text_held_for_a_possible_stop_string_is_flushed_at_the_end(tiny_loaded, scripted):
    sampling = SamplingConfig(max_new_tokens=scripted, stop=("thank you.!",))
    tokens, done = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    assert done.text == SCRIPT and done.reason == "length"
    assert tokens[-1].token_id == FLUSH_TOKEN_ID and tokens[-1].text.endswith("thank you.")
    assert "".join(t.text for t in tokens) == SCRIPT


def test_cancel_between_tokens(tiny_loaded):
    received: list[int] = []
    sampling = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=50)
    stream = stream_generation(
        tiny_loaded,
        GenerateRequest(prompt=PROMPT, sampling=sampling),
        256,
        lambda: len(received) >= 2,
    )
    for event in stream:
        if isinstance(event, TokenReceived) and event.token_id != FLUSH_TOKEN_ID:
            received.append(event.token_id)
    assert isinstance(event, GenerationFinished)
    assert event.reason == "cancelled" and len(event.token_ids) == 2


def test_between_tokens_hook_runs_before_each_decode_step(tiny_loaded):
    calls: list[int] = []
    sampling = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=4)

    def hook() -> None:
        calls.append(len(tiny_loaded.offload.steps))

    _tokens, done = run(
        tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling), between_tokens=hook
    )
    assert calls == list(range(1, len(done.token_ids))), "once between consecutive tokens"


def test_seeded_sampling_reproducible(tiny_loaded):
    sampling = SamplingConfig(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=10, seed=7)
    _t, first = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    _t, second = run(tiny_loaded, GenerateRequest(prompt=PROMPT, sampling=sampling))
    assert first.token_ids == second.token_ids


def test_chat_template_from_tokenizer_is_applied(tiny_loaded):
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello"))
    text = render_chat(tiny_loaded.tokenizer, messages, None)
    assert text == "<|system|>Be brief.<|end|><|user|>Hello<|end|><|assistant|>"
    prepared = prepare_prompt(tiny_loaded.tokenizer, GenerateRequest(messages=messages), 1024)
    assert list(prepared.ids) == tiny_loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_override_template_is_used(tiny_loaded):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text = render_chat(tiny_loaded.tokenizer, (ChatMessage("user", "Hello"),), template)
    assert text == "[user] Hello\n"


def test_broken_template_is_a_clear_error(tiny_loaded):
    with pytest.raises(InvalidRequestError, match="chat template"):
        render_chat(tiny_loaded.tokenizer, (ChatMessage("user", "Hi"),), "{% for %}")


def chat(turns: int) -> tuple[ChatMessage, ...]:
    messages = [ChatMessage("system", "You are kind.")]
    for i in range(turns):
        messages += [
            ChatMessage("user", f"Question {i} about the fox"),
            ChatMessage("assistant", f"Answer {i}"),
        ]
    return (*messages, ChatMessage("user", "Last question"))


def test_context_overflow_drops_oldest_turns(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    messages = chat(4)
    full = len(encode_chat(tokenizer, messages, None))
    keep_two_turns = len(encode_chat(tokenizer, (messages[0], *messages[5:]), None))
    sampling = SamplingConfig(max_new_tokens=16)
    context = keep_two_turns + 16
    assert full > keep_two_turns
    prepared = prepare_prompt(
        tokenizer, GenerateRequest(messages=messages, sampling=sampling), context
    )
    assert prepared.dropped_messages == 4, "the two oldest user/assistant turns go"
    assert list(prepared.ids) == encode_chat(tokenizer, (messages[0], *messages[5:]), None)


def test_generation_reports_dropped_messages(tiny_loaded):
    messages = chat(4)
    budget = len(encode_chat(tiny_loaded.tokenizer, (messages[0], messages[-1]), None))
    sampling = SamplingConfig(greedy=True, max_new_tokens=4)
    _tokens, done = run(
        tiny_loaded, GenerateRequest(messages=messages, sampling=sampling), budget + 4
    )
    assert done.dropped_messages == 8 and done.prompt_tokens == budget


def test_last_user_message_too_long_is_refused(tiny_loaded):
    messages = (ChatMessage("system", "Be kind."), ChatMessage("user", "word " * 200))
    request = GenerateRequest(messages=messages, sampling=SamplingConfig(max_new_tokens=8))
    with pytest.raises(InvalidRequestError, match="last message"):
        prepare_prompt(tiny_loaded.tokenizer, request, 64)


def test_prompt_too_long_or_no_room_for_reply_is_refused(tiny_loaded):
    with pytest.raises(InvalidRequestError, match="prompt is"):
        request = GenerateRequest(prompt="word " * 200, sampling=SamplingConfig(max_new_tokens=8))
        prepare_prompt(tiny_loaded.tokenizer, request, 64)
    request = GenerateRequest(prompt="hi", sampling=SamplingConfig(max_new_tokens=64))
    with pytest.raises(InvalidRequestError, match="below the context length"):
        prepare_prompt(tiny_loaded.tokenizer, request, 64)


def test_score_matches_full_forward(tiny_loaded):
    ids = list(
        tiny_loaded.tokenizer("In the beginning God created the heaven and the earth.")["input_ids"]
    )
    result = score_tokens(tiny_loaded, ids, keep_logits=True)
    reference = full_logits(tiny_loaded.model, ids)  # [T, V]
    assert result.logits is not None and result.logits.shape == reference.shape
    torch.testing.assert_close(result.logits, reference, atol=0, rtol=0)
    expected = torch.nn.functional.cross_entropy(
        reference[:-1], torch.tensor(ids[1:]), reduction="none"
    )
    torch.testing.assert_close(result.nll, expected)
    assert result.perplexity == pytest.approx(float(torch.exp(expected.mean())), rel=1e-5)


def test_score_in_chunks_equals_one_pass(tiny_loaded):
    ids = list(
        tiny_loaded.tokenizer("Python is a programming language that lets you work quickly.")[
            "input_ids"
        ]
    )
    whole = score_tokens(tiny_loaded, ids)
    chunked = score_tokens(tiny_loaded, ids, chunk_size=3)
    torch.testing.assert_close(chunked.nll, whole.nll, atol=1e-5, rtol=1e-5)
    assert tiny_loaded.offload.steps[-1] == len(ids) % 3 or tiny_loaded.offload.steps[-1] == 3


def test_score_needs_two_tokens_and_honours_cancel(tiny_loaded):
    with pytest.raises(InvalidRequestError):
        score_tokens(tiny_loaded, [5])
    with pytest.raises(CancelledError):
        score_tokens(tiny_loaded, [5, 6, 7], cancelled=lambda: True)
