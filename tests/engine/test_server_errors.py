"""The server refuses bad requests with OpenAI-style 4xx JSON and keeps serving.

Raw HTTP (httpx) against a real server on a loopback port, over a scripted engine. Covers the
fuzz set of malformed bodies, the body size limit, the API key, closed CORS, the Host check
and the rules for listening beyond loopback.
"""

from __future__ import annotations

import json

import httpx
import pytest

from engine.errors import InvalidRequestError
from engine.server import ServerConfig
from engine.server.guard import host_name, key_matches
from tests.engine.server_fixtures import MODEL_ID, running_server
from tests.helpers.echo_engine import EchoEngine

GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello there"}]}
USER = [{"role": "user", "content": "hi"}]

FUZZ: list[tuple[str, object, int]] = [
    ("invalid JSON", b"{not json", 400),
    ("empty body", b"", 400),
    ("a JSON list", [GOOD], 400),
    ("a JSON string", "hello", 400),
    ("no messages", {"model": MODEL_ID}, 400),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400),
    ("messages not a list", {"model": MODEL_ID, "messages": "hi"}, 400),
    ("bad role", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("tool role", {"model": MODEL_ID, "messages": [{"role": "tool", "content": "x"}]}, 400),
    ("content a number", {"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}, 400),
    (
        "only blank user text",
        {"model": MODEL_ID, "messages": [{"role": "user", "content": " "}]},
        400,
    ),
    (
        "only a system message",
        {"model": MODEL_ID, "messages": [{"role": "system", "content": "x"}]},
        400,
    ),
    (
        "image part",
        {
            "model": MODEL_ID,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        400,
    ),
    ("unknown model", {"model": "gpt-9", "messages": USER}, 404),
    ("model missing", {"messages": USER}, 400),
    ("model a number", {"model": 7, "messages": USER}, 400),
    ("huge max_tokens", {"model": MODEL_ID, "messages": USER, "max_tokens": 10**12}, 400),
    ("max_tokens zero", {"model": MODEL_ID, "messages": USER, "max_tokens": 0}, 400),
    ("max_tokens a string", {"model": MODEL_ID, "messages": USER, "max_tokens": "10"}, 400),
    ("max_tokens a float", {"model": MODEL_ID, "messages": USER, "max_tokens": 1.5}, 400),
    (
        "huge max_completion_tokens",
        {"model": MODEL_ID, "messages": USER, "max_completion_tokens": 99999},
        400,
    ),
    ("temperature a string", {"model": MODEL_ID, "messages": USER, "temperature": "hot"}, 400),
    ("temperature negative", {"model": MODEL_ID, "messages": USER, "temperature": -1}, 400),
    ("temperature 3", {"model": MODEL_ID, "messages": USER, "temperature": 3}, 400),
    ("top_p zero", {"model": MODEL_ID, "messages": USER, "top_p": 0}, 400),
    ("n = 2", {"model": MODEL_ID, "messages": USER, "n": 2}, 400),
    ("stop a number", {"model": MODEL_ID, "messages": USER, "stop": 3}, 400),
    ("five stops", {"model": MODEL_ID, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("empty stop", {"model": MODEL_ID, "messages": USER, "stop": [""]}, 400),
    ("seed a string", {"model": MODEL_ID, "messages": USER, "seed": "x"}, 400),
    ("stream a string", {"model": MODEL_ID, "messages": USER, "stream": "yes"}, 400),
    ("logprobs", {"model": MODEL_ID, "messages": USER, "logprobs": True}, 400),
    ("tools", {"model": MODEL_ID, "messages": USER, "tools": [{"type": "function"}]}, 400),
    ("functions", {"model": MODEL_ID, "messages": USER, "functions": [{"name": "f"}]}, 400),
    ("tool_choice required", {"model": MODEL_ID, "messages": USER, "tool_choice": "required"}, 400),
    (
        "JSON mode",
        {"model": MODEL_ID, "messages": USER, "response_format": {"type": "json_object"}},
        400,
    ),
    (
        "response_format a string",
        {"model": MODEL_ID, "messages": USER, "response_format": "x"},
        400,
    ),
    ("presence_penalty", {"model": MODEL_ID, "messages": USER, "presence_penalty": 0.5}, 400),
    ("frequency_penalty", {"model": MODEL_ID, "messages": USER, "frequency_penalty": -1}, 400),
    ("logit_bias", {"model": MODEL_ID, "messages": USER, "logit_bias": {"50256": -100}}, 400),
    ("n negative", {"model": MODEL_ID, "messages": USER, "n": -1}, 400),
    ("alpha too high", {"model": MODEL_ID, "messages": USER, "understudy": {"alpha": 5}}, 400),
    (
        "unknown policy",
        {"model": MODEL_ID, "messages": USER, "understudy": {"policy": "fifo"}},
        400,
    ),
    ("understudy a list", {"model": MODEL_ID, "messages": USER, "understudy": [1]}, 400),
    (
        "NaN temperature",
        b'{"model": "echo-model", "messages": [{"role": "user", "content": "x"}], '
        b'"temperature": NaN}',
        400,
    ),
]


def post(client: httpx.Client, path: str, body: object, **kwargs: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, **kwargs)  # type: ignore[arg-type]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"], error
    assert "Traceback" not in response.text
    return error


@pytest.fixture(scope="module")
def server():
    engine = EchoEngine()
    with running_server(engine) as handle:
        yield handle
    engine.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=10) as client:
        yield client


@pytest.mark.parametrize(("name", "body", "status"), FUZZ, ids=[case[0] for case in FUZZ])
def test_malformed_chat_request_gets_openai_error_and_the_server_still_serves(
    client, name, body, status
):
    assert_openai_error(post(client, "/v1/chat/completions", body), status)
    response = post(client, "/v1/chat/completions", GOOD)
    assert response.status_code == 200, f"after {name}: {response.text}"
    assert response.json()["choices"][0]["message"]["content"] == "reply hello there"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL_ID},
        {"model": MODEL_ID, "prompt": ""},
        {"model": MODEL_ID, "prompt": ["a", "b"]},
        {"model": MODEL_ID, "prompt": 5},
        {"model": MODEL_ID, "prompt": "x", "echo": True},
        {"model": MODEL_ID, "prompt": "x", "max_tokens": 10**9},
        {"model": MODEL_ID, "prompt": "x", "best_of": 3},
        {"model": MODEL_ID, "prompt": "x", "n": 2},
        {"model": MODEL_ID, "prompt": "x", "presence_penalty": 1},
    ],
)
def test_malformed_completion_request_gets_400(client, body):
    assert_openai_error(post(client, "/v1/completions", body), 400)


def test_n_above_one_is_refused_in_words(client):
    error = assert_openai_error(post(client, "/v1/chat/completions", {**GOOD, "n": 3}), 400)
    assert error["param"] == "n" and "one choice per request" in error["message"], error


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    neutral = {
        **GOOD,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "user": "someone",
        "store": False,
    }
    response = post(client, "/v1/chat/completions", neutral)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "reply hello there"


def test_ten_megabyte_body_is_refused_with_413(client):
    big = b'{"model": "echo-model", "messages": [{"role": "user", "content": "' + b"a" * 10_000_000
    error = assert_openai_error(post(client, "/v1/chat/completions", big + b'"}]}'), 413)
    assert "larger than" in error["message"]
    assert post(client, "/v1/chat/completions", GOOD).status_code == 200


def test_chunked_body_over_the_limit_is_refused_without_content_length(client):
    def chunks():
        for _ in range(20):
            yield b"a" * 100_000

    response = client.post("/v1/chat/completions", content=chunks())
    assert_openai_error(response, 413)


def test_unknown_route_and_wrong_method_are_json(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_browser_origin_is_refused_by_default(client):
    response = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert_openai_error(response, 403)
    assert "access-control-allow-origin" not in response.headers


def test_allowed_origin_gets_cors_headers():
    engine = EchoEngine()
    with running_server(engine, cors_origins=("https://ok.example",)) as handle:
        url = handle.url.removesuffix("/v1")
        ok = httpx.get(f"{url}/v1/models", headers={"Origin": "https://ok.example"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://ok.example"
        other = httpx.get(f"{url}/v1/models", headers={"Origin": "https://evil.example"})
        assert other.status_code == 403
    engine.shutdown()


def test_foreign_host_header_is_refused_on_loopback(client):
    response = client.get("/v1/models", headers={"Host": "attacker.example:8080"})
    assert_openai_error(response, 403)


def test_api_key_is_required_when_set():
    engine = EchoEngine()
    with running_server(engine, api_key="s3cret") as handle:
        url = handle.url.removesuffix("/v1")
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401)
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        basic = httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic s3cret"})
        assert_openai_error(basic, 401)
        right = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
    engine.shutdown()


def test_key_compare_and_host_parsing():
    assert key_matches("Bearer abc", "abc")
    assert not key_matches("Bearer abd", "abc")
    assert not key_matches(None, "abc")
    assert host_name("[::1]:8080") == "::1"
    assert host_name("localhost:1") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"


def test_non_loopback_needs_the_flag_and_a_key():
    with pytest.raises(InvalidRequestError, match="--allow-remote"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(InvalidRequestError, match="API key"):
        ServerConfig(host="0.0.0.0", allow_remote=True)
    assert not ServerConfig(host="0.0.0.0", allow_remote=True, api_key="k").loopback
    assert ServerConfig(host="::1").loopback and ServerConfig(host="localhost").loopback
    with pytest.raises(InvalidRequestError, match="empty"):
        ServerConfig(api_key="  ")


def test_a_taken_port_is_reported_in_words(server):
    engine = EchoEngine()
    with (
        pytest.raises(InvalidRequestError, match="another server"),
        running_server(engine, port=server.port),
    ):
        pass
    engine.shutdown()


def test_unknown_model_id_route_is_404(client):
    assert_openai_error(client.get("/v1/models/gpt-4o"), 404)
    assert client.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID


def test_serves_on_ipv6_loopback_too():
    import socket

    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    finally:
        probe.close()
    engine = EchoEngine()
    with running_server(engine, host="::1") as handle:
        assert handle.url.startswith("http://[::1]:")
        assert httpx.get(f"{handle.url}/models").json()["data"][0]["id"] == MODEL_ID
    engine.shutdown()
