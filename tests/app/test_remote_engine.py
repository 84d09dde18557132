"""The app's remote engine against this project's own server on a loopback port.

A real server (``engine.server``) over a scripted engine, and once over the real engine with
a tiny checkpoint; a malformed-server fake (``httpx.MockTransport``) covers the error paths.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from app.remote_engine import RemoteEngine, RemoteError, RemoteSpec, normalize_base_url
from engine.config import ChatMessage, GenerateRequest, LiveOptions, LoadConfig, SamplingConfig
from engine.errors import InvalidRequestError, ModelLoadError
from engine.events import GenerationFinished, LoadFinished, TokenReceived
from tests.engine.server_fixtures import MODEL_ID, running_server
from tests.helpers.echo_engine import EchoEngine

TIMEOUT = 30


def ask(text: str, max_tokens: int = 50, live: LiveOptions | None = None) -> GenerateRequest:
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    return GenerateRequest(messages=(ChatMessage("user", text),), sampling=sampling, live=live)


class Events(list):
    def __call__(self, event: object) -> None:
        self.append(event)

    def tokens(self) -> str:
        return "".join(e.text for e in self if isinstance(e, TokenReceived))


def connect(remote: RemoteEngine) -> Events:
    events = Events()
    remote.load(LoadConfig(Path("remote")), events).result(TIMEOUT)
    return events


@pytest.fixture
def echo():
    engine = EchoEngine()
    yield engine
    engine.shutdown()


@pytest.fixture
def served(echo):
    with running_server(echo) as handle:
        yield handle


@pytest.fixture
def remote(served):
    remote = RemoteEngine(RemoteSpec(served.url, MODEL_ID))
    yield remote
    remote.shutdown()


def test_load_connects_and_recognizes_an_understudy_server(remote):
    events = connect(remote)
    finished = [e for e in events if isinstance(e, LoadFinished)]
    assert finished and finished[0].info.name == MODEL_ID
    assert remote.understudy and finished[0].info.substitution_supported


def test_chat_streams_tokens_and_finishes_with_remote_counters(remote):
    connect(remote)
    events = Events()
    finished = remote.generate(ask("hello remote world"), events).result(TIMEOUT)
    assert events.tokens() == "reply hello remote world" == finished.text
    assert finished.reason == "stop"
    assert isinstance(events[-1], GenerationFinished)
    assert finished.stats.tokens == 4 and finished.stats.hits == 12, finished.stats
    assert remote.stats() == finished.stats


def test_alpha_and_policy_travel_as_understudy_extras(remote, echo):
    connect(remote)
    remote.set_live_options(LiveOptions(policy="smoe", alpha=0.25))
    remote.generate(ask("x"), Events()).result(TIMEOUT)
    assert echo.record.live[-1] == LiveOptions(policy="smoe", alpha=0.25)


def test_stop_closes_the_stream_and_the_server_cancels():
    echo = EchoEngine(token_delay=0.02, repeat=100)
    with running_server(echo, context_length=4096) as handle:
        remote = RemoteEngine(RemoteSpec(handle.url, MODEL_ID))
        connect(remote)
        three = threading.Event()
        events = Events()

        def sink(event: object) -> None:
            events(event)
            if len(events) >= 3:
                three.set()

        job = remote.generate(ask("a b c", max_tokens=400), sink)
        assert three.wait(TIMEOUT)
        job.cancel()
        finished = job.result(TIMEOUT)
        assert finished.reason == "cancelled"
        assert len(finished.text.split()) < 50
        for _ in range(500):
            if echo.record.finished:
                break
            threading.Event().wait(0.01)
        assert echo.record.finished == ["cancelled"]
        remote.shutdown()
    echo.shutdown()


def test_regenerate_is_just_another_request(remote):
    connect(remote)
    first = remote.generate(ask("same"), Events()).result(TIMEOUT)
    second = remote.generate(ask("same"), Events()).result(TIMEOUT)
    assert first.text == second.text == "reply same"


def test_api_key_is_sent_and_a_wrong_one_is_explained(echo):
    with running_server(echo, api_key="secret-key") as handle:
        good = RemoteEngine(RemoteSpec(handle.url, MODEL_ID, api_key="secret-key"))
        connect(good)
        assert good.generate(ask("k"), Events()).result(TIMEOUT).text == "reply k"
        good.shutdown()
        bad = RemoteEngine(RemoteSpec(handle.url, MODEL_ID, api_key="wrong"))
        with pytest.raises(ModelLoadError, match="API key"):
            connect(bad)
        bad.shutdown()
    assert "secret" not in repr(RemoteSpec(handle.url, MODEL_ID, api_key="secret-key"))


def test_unknown_model_lists_what_the_server_serves(served):
    remote = RemoteEngine(RemoteSpec(served.url, "llama-70b"))
    with pytest.raises(ModelLoadError, match=MODEL_ID):
        connect(remote)
    remote.shutdown()


def test_unreachable_server_is_explained():
    remote = RemoteEngine(RemoteSpec("http://127.0.0.1:9", "m"))
    with pytest.raises(ModelLoadError, match="Cannot reach"):
        connect(remote)
    remote.shutdown()


def test_base_url_is_normalized_and_checked():
    assert normalize_base_url("http://box:8000") == "http://box:8000/v1"
    assert normalize_base_url(" http://box:8000/v1/ ") == "http://box:8000/v1"
    for bad in ("", "box:8000", "ftp://box", "http://"):
        with pytest.raises(ValueError):
            normalize_base_url(bad)
    with pytest.raises(ValueError, match="model name"):
        RemoteSpec("http://box", " ")


def test_against_the_real_engine_with_a_tiny_model(tmp_path):
    from engine.config import CacheConfig
    from engine.runtime.engine import Engine
    from tests.helpers.tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "tiny")
    engine = Engine()
    config = LoadConfig(tmp_path / "tiny", device="cpu", cache=CacheConfig(fraction=0.5))
    engine.load(config, lambda event: None).result(60)
    with running_server(engine, "tiny", context_length=512) as handle:
        remote = RemoteEngine(RemoteSpec(handle.url, "tiny"))
        connect(remote)
        events = Events()
        greedy = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=8)
        request = GenerateRequest(messages=(ChatMessage("user", "Hello"),), sampling=greedy)
        finished = remote.generate(request, events).result(TIMEOUT)
        local = engine.generate(request, lambda event: None).result(TIMEOUT)
        assert finished.text == events.tokens() == local.text
        assert finished.stats.tokens > 0 and finished.stats.hits + finished.stats.misses > 0
        remote.shutdown()
    engine.shutdown()


# ---------------------------------------------------------------- a malformed server


MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


def fake_server(stream_body: bytes, status: int = 200, models: object = MODELS):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            if isinstance(models, bytes):
                return httpx.Response(200, content=models)
            return httpx.Response(200, json=models)
        if request.url.path.endswith("/understudy/stats"):
            return httpx.Response(404, json={"error": {"message": "no"}})
        return httpx.Response(status, content=stream_body)

    return RemoteEngine(RemoteSpec("http://fake", "m"), transport=httpx.MockTransport(handle))


def chunk(content: object) -> str:
    return "data: " + json.dumps({"choices": [{"delta": {"content": content}}]}) + "\n\n"


GOOD_STREAM = (chunk("Hel") + chunk("lo") + "data: [DONE]\n\n").encode()


def test_a_plain_openai_server_gives_text_and_speed_but_no_offload_counters():
    remote = fake_server(GOOD_STREAM)
    connect(remote)
    assert not remote.understudy
    finished = remote.generate(ask("hi"), Events()).result(TIMEOUT)
    assert finished.text == "Hello" and finished.stats.hits == 0
    with pytest.raises(InvalidRequestError, match="not Understudy"):
        remote.set_live_options(LiveOptions(policy="smoe", alpha=0.3))
    assert "understudy" not in remote.body(ask("x"))
    remote.shutdown()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"data: {not json\n\n", 200, "not JSON"),
        (b'data: {"id": 1}\n\n', 200, "without 'choices'"),
        (b"data: [1, 2]\n\n", 200, "not a JSON object"),
        ((chunk(5) + "data: [DONE]\n\n").encode(), 200, "not text"),
        (b'data: {"error": {"message": "engine exploded"}}\n\n', 200, "engine exploded"),
        (b'{"error": {"message": "model overloaded"}}', 503, "model overloaded"),
        (b"<html>Bad gateway</html>", 502, "502"),
    ],
)
def test_malformed_replies_become_clear_errors_and_the_engine_lives_on(body, status, message):
    remote = fake_server(body, status)
    connect(remote)
    with pytest.raises(RemoteError, match=message):
        remote.generate(ask("hi"), Events()).result(TIMEOUT)
    assert remote._thread.is_alive()
    remote.shutdown()


@pytest.mark.parametrize("models", [b"<html>", {"models": []}, [1, 2]])
def test_a_server_without_an_openai_model_list_is_refused_at_load(models):
    remote = fake_server(GOOD_STREAM, models=models)
    with pytest.raises(ModelLoadError, match="OpenAI"):
        connect(remote)
    remote.shutdown()
