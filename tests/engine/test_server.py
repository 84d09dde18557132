"""The server speaks OpenAI: the official ``openai`` client against a real loopback server.

Over the real engine with the tiny checkpoint (chat and text completions, streaming and not,
usage, stop, seed, the ``understudy`` extras and live stats), and over the scripted engine for
what needs control of time: 50 concurrent streams, and a disconnect cancelling its generation.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from engine.config import (
    CacheConfig,
    ChatMessage,
    GenerateRequest,
    LiveOptions,
    LoadConfig,
    SamplingConfig,
)
from engine.runtime.engine import Engine
from tests.engine.server_fixtures import MODEL_ID, running_server
from tests.helpers.echo_engine import EchoEngine

TINY_ID = "tiny-moe"


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def real_server(tiny_checkpoint):
    engine = Engine()
    config = LoadConfig(tiny_checkpoint.path, device="cpu", cache=CacheConfig(fraction=0.5))
    info = engine.load(config, lambda event: None).result(60)
    assert info.substitution_supported
    with running_server(engine, TINY_ID, context_length=2048) as handle:
        yield handle, engine
    engine.shutdown()


def test_models_lists_the_served_model(real_server):
    handle, _ = real_server
    models = client_for(handle.url).models.list()
    assert [m.id for m in models.data] == [TINY_ID]
    assert client_for(handle.url).models.retrieve(TINY_ID).id == TINY_ID


def test_chat_completion_not_streaming_has_text_usage_and_extras(real_server):
    handle, _ = real_server
    reply = client_for(handle.url).chat.completions.create(
        model=TINY_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    extras = reply.model_extra["understudy"]
    assert extras["policy"] == "lru" and extras["alpha"] == 0.0
    assert 0.0 <= extras["stats"]["hit_rate"] <= 1.0
    assert extras["stats"]["tokens"] >= reply.usage.completion_tokens


def test_streaming_joins_to_the_same_text_as_not_streaming(real_server):
    handle, _ = real_server
    client = client_for(handle.url)
    messages = [{"role": "user", "content": "Tell me about the fox"}]
    whole = client.chat.completions.create(
        model=TINY_ID, messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=TINY_ID,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_seed_makes_sampling_repeatable(real_server):
    handle, _ = real_server
    client = client_for(handle.url)

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=TINY_ID,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=10,
            temperature=1.5,
            seed=seed,
        )
        return reply.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 5)}) > 1, "different seeds, different samples"


def test_text_completion_and_max_tokens(real_server):
    handle, _ = real_server
    client = client_for(handle.url)
    reply = client.completions.create(model=TINY_ID, prompt="The quick brown", max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.usage.completion_tokens <= 3
    streamed = client.completions.create(
        model=TINY_ID, prompt="The quick brown", max_tokens=3, temperature=0, stream=True
    )
    greedy = client.completions.create(
        model=TINY_ID, prompt="The quick brown", max_tokens=3, temperature=0
    )
    assert "".join(c.choices[0].text for c in streamed) == greedy.choices[0].text


def test_stop_strings_end_the_reply_before_them_streaming_or_not(real_server):
    handle, _ = real_server
    client = client_for(handle.url)
    chat = {"model": TINY_ID, "messages": [{"role": "user", "content": "Tell me a story"}]}
    free = client.chat.completions.create(**chat, max_tokens=24, temperature=0)
    text = free.choices[0].message.content or ""
    assert len(text) >= 6, f"the tiny model wrote too little to cut: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.index(stop)]
    whole = client.chat.completions.create(
        **chat, max_tokens=24, temperature=0, stop=["\u2603never", stop]
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        **chat, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_the_reply_and_wins_over_max_tokens(real_server):
    handle, _ = real_server
    client = client_for(handle.url)
    chat = {"model": TINY_ID, "messages": [{"role": "user", "content": "Count to ten"}]}
    longer = client.chat.completions.create(**chat, temperature=0, max_completion_tokens=8)
    reply = client.chat.completions.create(
        **chat, temperature=0, max_completion_tokens=3, max_tokens=8
    )
    assert reply.usage.completion_tokens == min(3, longer.usage.completion_tokens)
    if longer.usage.completion_tokens > 3:
        assert reply.choices[0].finish_reason == "length"
        assert (longer.choices[0].message.content or "").startswith(
            reply.choices[0].message.content or ""
        )


def test_text_completion_stream_carries_usage_when_asked(real_server):
    handle, _ = real_server
    client = client_for(handle.url)
    asked = {"model": TINY_ID, "prompt": "The quick brown", "max_tokens": 4, "temperature": 0}
    chunks = list(
        client.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (
        chunks[-1].usage.completion_tokens
        == client.completions.create(**asked).usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(**asked, stream=True))
    assert all(c.usage is None for c in plain), "no usage chunk unless asked"
    assert all(c.object == "text_completion" for c in plain)


def test_understudy_extras_apply_to_one_request_only(real_server):
    handle, engine = real_server
    client = client_for(handle.url)
    reply = client.chat.completions.create(
        model=TINY_ID,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_body={"understudy": {"alpha": 0.3, "policy": "smoe"}},
    )
    assert reply.model_extra["understudy"]["alpha"] == 0.3
    assert reply.model_extra["understudy"]["policy"] == "smoe"
    assert engine._session.config.live == LiveOptions(), "the engine's own options came back"


def test_live_stats_endpoint(real_server):
    handle, _ = real_server
    client_for(handle.url).chat.completions.create(
        model=TINY_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    stats = httpx.get(handle.url + "/understudy/stats").json()
    assert stats["model"] == TINY_ID
    assert stats["queue"]["running"] == 0 and stats["queue"]["served"] >= 1
    assert stats["queue"]["after_cancel_max"] <= 1, stats["queue"]
    assert stats["queue"]["after_cancel_total"] >= 0
    assert stats["stats"]["tokens"] > 0 and "hit_rate" in stats["stats"]


def test_unknown_model_raises_not_found_in_the_client(real_server):
    handle, _ = real_server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client_for(handle.url).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
        )


def test_openai_client_with_the_api_key():
    engine = EchoEngine()
    with running_server(engine, api_key="k-123") as handle:
        with pytest.raises(openai.AuthenticationError):
            client_for(handle.url, "wrong").models.list()
        reply = client_for(handle.url, "k-123").chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "a b"}]
        )
        assert reply.choices[0].message.content == "reply a b"
    engine.shutdown()


def test_fifty_concurrent_streams_all_complete_with_their_own_tokens():
    engine = EchoEngine(token_delay=0.001)
    with running_server(engine) as handle:
        client = client_for(handle.url)

        def chat(index: int) -> str:
            words = f"client {index} says w{index}a w{index}b w{index}c"
            stream = client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": words}], stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(50) as pool:
            texts = list(pool.map(chat, range(50)))
            state = handle.routes.gate.state()
            tasks_after_one = server_tasks(handle)
            for _ in range(2):  # more waves: nothing piles up on the server
                assert list(pool.map(chat, range(50))) == texts
            tasks_after_three = server_tasks(handle)
    engine.shutdown()
    for index, text in enumerate(texts):
        assert text == f"reply client {index} says w{index}a w{index}b w{index}c", text
    assert state.served == 50 and state.waiting == 0 and state.running == 0
    assert len(engine.record.started) == 150
    assert tasks_after_three <= tasks_after_one, "no task left behind by finished streams"


def server_tasks(handle) -> int:
    """Tasks alive on the server's event loop (its connections and their handlers)."""
    time.sleep(0.2)  # let closing connections finish
    return handle.tasks()


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_disconnected_stream_cancels_its_generation_within_one_token():
    engine = EchoEngine(token_delay=0.1, repeat=100)
    with running_server(engine, context_length=4096) as handle:
        gate = handle.routes.gate
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "a b c d"}],
            "max_tokens": 400,
            "stream": True,
        }
        with httpx.stream("POST", handle.url + "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            seen = [next(lines) for _ in range(6)]
        closed = time.monotonic()  # the client has closed its connection
        assert any("content" in line for line in seen)
        wait_for(lambda: gate.state().cancelled == 1)
        state = gate.state()
        assert engine.record.finished == ["cancelled"]
        assert state.cancelled == 1 and state.running == 0
        # counted by the server from when it saw the disconnect: the token being made then
        assert state.after_cancel_max <= 1, state
        assert engine.record.after_cancel[0] <= 1, engine.record.after_cancel
        # and from when the client closed (the server needs a moment to see it)
        after_close = sum(stamp > closed for stamp in engine.record.token_times)
        assert after_close <= 2, f"{after_close} tokens after the client closed"
        assert len(engine.record.token_times) < 20, "the 400-token generation stopped early"
        follow = httpx.post(
            handle.url + "/chat/completions", json={**body, "stream": False, "max_tokens": 3}
        )
        assert follow.json()["choices"][0]["message"]["content"] == "reply a b"
    engine.shutdown()


def test_a_disconnected_plain_request_cancels_its_generation():
    engine = EchoEngine(token_delay=0.02, repeat=100)
    with running_server(engine, context_length=4096) as handle:
        gate = handle.routes.gate
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "a b"}],
            "max_tokens": 300,
        }
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(handle.url + "/chat/completions", json=body, timeout=0.3)
        wait_for(lambda: gate.state().cancelled == 1)
        assert engine.record.finished == ["cancelled"]
        assert gate.state().after_cancel_max <= 1, gate.state()
        assert engine.record.after_cancel[0] <= 1
    engine.shutdown()


def test_requests_wait_their_turn_and_the_queue_is_visible():
    engine = EchoEngine(token_delay=0.02, repeat=10)
    with running_server(engine, context_length=4096) as handle:
        client = client_for(handle.url)
        peak = {"waiting": 0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak["waiting"] = max(peak["waiting"], handle.routes.gate.state().waiting)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(3) as pool:
            list(
                pool.map(
                    lambda i: client.chat.completions.create(
                        model=MODEL_ID,
                        messages=[{"role": "user", "content": f"m{i}"}],
                        max_tokens=20,
                    ),
                    range(3),
                )
            )
        stop.set()
        watcher.join()
    engine.shutdown()
    assert peak["waiting"] >= 1, "while one request ran, others were seen waiting"


def test_a_client_leaving_the_queue_never_reaches_the_engine():
    engine = EchoEngine(token_delay=0.02, repeat=100)
    with running_server(engine, context_length=4096) as handle:
        gate = handle.routes.gate
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "first"}],
            "max_tokens": 300,
            "stream": True,
        }
        with httpx.stream("POST", handle.url + "/chat/completions", json=body) as first:
            lines = first.iter_lines()
            next(lines)
            second_body = {**body, "messages": [{"role": "user", "content": "second"}]}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(handle.url + "/chat/completions", json=second_body, timeout=0.3)
            third_body = {**second_body, "stream": True}
            with (
                pytest.raises(httpx.ReadTimeout),
                httpx.stream(
                    "POST", handle.url + "/chat/completions", json=third_body, timeout=0.3
                ) as third,
            ):
                third.read()
            deadline = time.monotonic() + 2
            while gate.state().waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gate.state().waiting == 0, "the queued clients that left are no longer counted"
        deadline = time.monotonic() + 5
        while gate.state().running and time.monotonic() < deadline:
            time.sleep(0.01)
    engine.shutdown()
    assert engine.record.started == ["first"], "the second request never started generating"


def test_a_live_change_during_an_overriding_request_applies_after_it(real_server):
    _, engine = real_server
    changed = threading.Event()

    def sink(event: object) -> None:
        if not changed.is_set():
            engine.set_live_options(LiveOptions(policy="lfu"))
            changed.set()

    live = LiveOptions(policy="smoe", alpha=0.3)
    request = GenerateRequest(
        messages=(ChatMessage("user", "Hi"),), sampling=SamplingConfig(max_new_tokens=4), live=live
    )
    engine.generate(request, sink).result(60)
    assert changed.is_set()
    plain = GenerateRequest(prompt="x", sampling=request.sampling)
    engine.generate(plain, lambda event: None).result(60)
    assert engine._session.config.live == LiveOptions(policy="lfu"), "the app's change won"
    engine.set_live_options(LiveOptions())


def test_a_disconnect_stops_the_real_engine_early(real_server):
    handle, engine = real_server
    gate = handle.routes.gate
    cancelled_before = gate.state().cancelled
    body = {
        "model": TINY_ID,
        "prompt": "The quick brown fox",
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", handle.url + "/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    before = engine.stats().tokens
    wait_for(lambda: gate.state().cancelled == cancelled_before + 1, timeout=30)
    state = gate.state()
    assert state.running == 0 and state.cancelled == cancelled_before + 1
    assert state.after_cancel_max <= 1, f"the real engine made more than one token: {state}"
    follow = client_for(handle.url).completions.create(model=TINY_ID, prompt="Hi", max_tokens=1)
    assert follow.usage.completion_tokens == 1
    assert engine.stats().tokens - before < 100, "the 1500-token generation stopped early"
