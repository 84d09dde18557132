"""Models > Add remote… and the server switch in the window, against real loopback servers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.main_window import MainWindow
from app.remote_actions import NO_TELEMETRY
from app.remote_engine import RemoteEngine
from app.remote_store import KeyStore
from tests.app.fake_engine import FakeEngine
from tests.app.test_remote_store import MemoryKeyring
from tests.app.test_ui_chat import path_texts, send_and_wait
from tests.engine.server_fixtures import MODEL_ID, running_server
from tests.helpers.echo_engine import EchoEngine


@pytest.fixture
def echo():
    engine = EchoEngine(token_delay=0.002)
    yield engine
    engine.shutdown()


@pytest.fixture
def server(echo):
    with running_server(echo, context_length=4096, api_key="sk-remote-123") as handle:
        yield handle


def add_remote(qtbot: Any, window: MainWindow, url: str, key: str = "sk-remote-123") -> None:
    dialog = window.remote.ask_remote()
    dialog.name.setText("big box")
    dialog.url.setText(url)
    dialog.key.setText(key)
    dialog.model.setText(MODEL_ID)
    dialog.submit()
    qtbot.waitUntil(lambda: window.controller.ready and window.model_info is not None, timeout=5000)
    assert window.model_info is not None and window.model_info.name == MODEL_ID


@pytest.fixture
def remote_window(qtbot, window, server):
    window.remote.keys = KeyStore(MemoryKeyring())
    add_remote(qtbot, window, server.url.removesuffix("/v1"))
    return window


def test_add_remote_then_chat_through_it(qtbot, remote_window, echo, user_dirs):
    window = remote_window
    assert isinstance(window.bridge.engine, RemoteEngine)
    send_and_wait(qtbot, window, "hello from the app")
    assert path_texts(window)[-1] == "reply hello from the app"
    assert echo.record.started[-1] == "app"
    for path in (user_dirs / "config").rglob("*"):
        if path.is_file():
            assert "sk-remote-123" not in path.read_text(errors="replace"), path
    database = (user_dirs / "data" / "chats.sqlite3").read_bytes()
    assert b"sk-remote-123" not in database


def test_stop_closes_the_remote_stream(qtbot, remote_window, echo):
    echo.token_delay, echo.repeat = 0.02, 100
    window = remote_window
    window.send("long one")
    qtbot.waitUntil(lambda: bool(echo.record.started), timeout=5000)
    qtbot.wait(100)
    window.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    qtbot.waitUntil(lambda: echo.record.finished == ["cancelled"], timeout=5000)


def test_an_understudy_server_shows_its_counters_in_the_panel(remote_window):
    assert remote_window.panel.engine_note is None
    assert remote_window.bridge.engine.understudy


def test_wrong_key_shows_why(qtbot, window, server):
    window.remote.keys = KeyStore(MemoryKeyring())
    dialog = window.remote.ask_remote()
    dialog.name.setText("box")
    dialog.url.setText(server.url)
    dialog.key.setText("wrong")
    dialog.model.setText(MODEL_ID)
    messages: list[str] = []
    window.ready.connect(messages.append)
    dialog.submit()
    qtbot.waitUntil(lambda: bool(messages), timeout=5000)
    assert "API key" in messages[0]


def test_bad_fields_are_explained_and_nothing_is_saved(window):
    dialog = window.remote.ask_remote()
    dialog.url.setText("not a url")
    dialog.model.setText("m")
    dialog.submit()
    assert "http" in dialog.problem.text()
    assert window.remote.store.load() == []
    assert not isinstance(window.bridge.engine, RemoteEngine)


def test_no_keyring_keeps_the_key_for_the_session_and_says_so(qtbot, window, server):
    import keyring.backends.fail

    window.remote.keys = KeyStore(keyring.backends.fail.Keyring())
    add_remote(qtbot, window, server.url)
    assert "this session only" in window.banner.label.text()


def test_back_to_local_engine(qtbot, remote_window, fake_engine):
    window = remote_window
    window.remote.back_to_local()
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert window.bridge.engine is fake_engine
    assert window.panel.engine_note is None
    assert window.model_info is not None and window.model_info.model_type != "remote"


def test_a_remote_last_used_is_resumed_at_start(qtbot, remote_window, make_window, monkeypatch):
    remote_window.close()
    keys = remote_window.remote.keys
    monkeypatch.setattr("app.remote_actions.KeyStore", lambda: keys)
    again = make_window(start=False)
    assert isinstance(again.bridge.engine, RemoteEngine)
    again.start(None)
    qtbot.waitUntil(lambda: again.controller.ready, timeout=5000)
    assert again.model_info is not None and again.model_info.name == MODEL_ID


def test_server_switch_serves_the_loaded_model(qtbot, window, fake_engine: FakeEngine):
    switch = window.remote.server
    switch.port = 0
    window.remote.server_action.setChecked(True)
    assert switch.on and switch.handle is not None
    url = switch.handle.url
    assert url in switch.status_text() and "0 waiting" in switch.status_text()
    models = httpx.get(f"{url}/models").json()
    assert models["data"][0]["id"] == window.model_info.name
    body = {"model": window.model_info.name, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{url}/chat/completions", json=body, timeout=10).json()
    assert reply["choices"][0]["message"]["content"] == "Hello there!"
    window.remote.server_action.setChecked(False)
    assert not switch.on and not switch.label.isVisible()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models")


def test_server_switch_is_off_by_default_and_refuses_a_remote_model(remote_window):
    switch = remote_window.remote.server
    assert not switch.on
    switch.port = 0
    remote_window.remote.server_action.setChecked(True)
    assert not switch.on and not remote_window.remote.server_action.isChecked()
    assert "not a remote" in remote_window.banner.label.text()


def test_a_remote_whose_key_was_session_only_is_not_resumed(qtbot, remote_window, make_window):
    remote_window.close()
    again = make_window(start=False)  # this machine's keyring has no key for it
    assert not isinstance(again.bridge.engine, RemoteEngine)
    again.start(None)
    qtbot.waitUntil(lambda: again.controller.ready, timeout=5000)
    assert "enter it again" in again.banner.label.text()


def test_a_plain_openai_server_leaves_a_note_instead_of_cache_counters(
    qtbot, window, server, monkeypatch
):
    monkeypatch.setattr(RemoteEngine, "_is_understudy", lambda self: False)
    window.remote.keys = KeyStore(MemoryKeyring())
    add_remote(qtbot, window, server.url)
    assert window.panel.engine_note == NO_TELEMETRY
    window.panel.update_readings()
    assert window.panel.labels["hit rate"].text() == "not available remotely"
    assert NO_TELEMETRY in window.panel.gpu_note.text()
    assert not window.slider.isEnabled() or not window.model_info.substitution_supported


def test_chat_and_server_take_turns_on_the_engine(qtbot, window, fake_engine: FakeEngine):
    import itertools
    import threading

    fake_engine.replies = itertools.cycle(["one two three four five six seven eight"])
    fake_engine.token_delay = 0.02
    switch = window.remote.server
    switch.port = 0
    window.remote.server_action.setChecked(True)
    url = switch.handle.url
    body = {"model": window.model_info.name, "messages": [{"role": "user", "content": "hi"}]}
    served: dict[str, str] = {}

    def call() -> None:
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=20).json()
        served["text"] = reply["choices"][0]["message"]["content"]

    client = threading.Thread(target=call)
    client.start()
    qtbot.waitUntil(lambda: switch.handle.routes.gate.state().running == 1, timeout=5000)
    window.send("and me")
    assert "1 answering" in switch.status_text()
    qtbot.waitUntil(lambda: not window.controller.generating and "text" in served, timeout=10000)
    client.join(5)
    assert served["text"] == "one two three four five six seven eight"
    assert path_texts(window)[-1] == "one two three four five six seven eight"
    window.set_alpha(0.3)
    switch.refresh()
    assert switch.handle.routes.served.live.alpha == 0.3
    window.remote.server_action.setChecked(False)


def test_remote_engine_frees_the_local_model_and_still_inspects_folders(
    qtbot, remote_window, fake_engine: FakeEngine, user_dirs
):
    qtbot.waitUntil(lambda: fake_engine.loaded is None, timeout=5000)
    folder = user_dirs / "builtin" / "understudy-mini-moe"
    info = remote_window.bridge.engine.inspect(folder).result(5)
    assert info.name == folder.name and fake_engine.calls.inspected[-1] == folder


def test_saved_remotes_are_listed_and_can_be_forgotten(qtbot, remote_window, fake_engine):
    actions = remote_window.remote
    actions._fill_remotes()
    titles = [a.text() for a in actions.remotes_menu.actions()]
    assert any(t.startswith("big box (") for t in titles) and "Forget" in titles
    entry = actions.store.get("big box")
    assert actions.keys.get(entry.key_id) == "sk-remote-123"
    actions.forget(entry)
    qtbot.waitUntil(lambda: remote_window.controller.ready, timeout=5000)
    assert actions.store.load() == [] and actions.keys.get(entry.key_id) is None
    assert remote_window.bridge.engine is fake_engine, "forgetting the one in use goes local"


def test_server_switch_moves_to_the_next_port_when_one_is_taken(window):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    switch = window.remote.server
    switch.port = taken
    try:
        window.remote.server_action.setChecked(True)
        assert switch.on and switch.handle.port != taken
        assert taken < switch.handle.port < taken + 10
    finally:
        window.remote.server_action.setChecked(False)
        holder.close()


def test_no_port_is_opened_and_no_connection_made_until_the_server_is_turned_on(
    qtbot, window, fake_engine: FakeEngine, monkeypatch
):
    import socket

    network = (socket.AF_INET, socket.AF_INET6)
    calls: list[tuple[str, object]] = []
    real_bind, real_connect = socket.socket.bind, socket.socket.connect

    def bind(sock: socket.socket, address: Any) -> None:
        if sock.family in network:
            calls.append(("bind", address))
        real_bind(sock, address)

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in network:
            calls.append(("connect", address))
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(socket.socket, "connect", connect)
    send_and_wait(qtbot, window, "offline?")
    window.show_library()
    window.panel.update_readings()
    assert calls == [], "no remote configured and the server off: no network at all"
    window.remote.server.port = 0
    window.remote.server_action.setChecked(True)
    try:
        assert [kind for kind, _ in calls] == ["bind"]
        assert calls[0][1][0] == "127.0.0.1", "the switch listens on loopback only"
    finally:
        window.remote.server_action.setChecked(False)
