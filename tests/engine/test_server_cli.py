"""``python -m engine serve``: refused addresses fail before loading; a real run serves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "0.0.0.0"], "--allow-remote"),
        (["--host", "192.168.1.5", "--allow-remote"], "API key"),
        (["--port", "70000"], "port"),
    ],
)
def test_refused_server_settings_exit_2_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("UNDERSTUDY_API_KEY", raising=False)
    assert main(["serve", "--model", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_runs_and_answers_until_interrupted(tiny_checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNDERSTUDY_API_KEY": "k"}
    command = [sys.executable, "-m", "engine", "serve", "--model", str(tiny_checkpoint.path)]
    command += ["--device", "cpu", "--port", "0", "--model-name", "tiny", "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "serve exited early"
            found = re.search(r"Serving tiny at (\S+)", line)
            url = found.group(1) if found else None
        assert url is not None and not url.endswith(":0/v1"), url
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(f"{url}/models", headers=headers).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "The quick", "max_tokens": 3}
        reply = httpx.post(f"{url}/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) in (0, 130), "Ctrl+C ends it like any command (130: interrupted)"
        assert "Traceback" not in process.stderr.read()
