"""Ctrl+Q while a reply streams: the app exits 0 and logs no Qt error.

It used to log "Internal C++ object (_SimpleTimer) already deleted" (the reply's task was
left pending when the loop closed, and its clean-up scheduled on qasync's deleted timer), and
sometimes crashed at exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("quit_mid_reply.py")
BAD = ("already deleted", "Traceback", "Fatal Python error", "Task was destroyed")


def quit_after(seconds: float, *how: str) -> tuple[subprocess.CompletedProcess[str], str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(DRIVER), str(seconds), *how],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = Path(os.environ["UNDERSTUDY_DATA_DIR"]) / "logs" / "understudy.log"
    return result, log.read_text(encoding="utf-8") if log.exists() else ""


def test_quitting_mid_reply_exits_cleanly_and_logs_no_qt_error(user_dirs: Path) -> None:
    for attempt in range(2):
        result, log = quit_after(0.6)
        output = result.stdout + result.stderr
        assert "QUIT generating=True" in result.stdout, f"quit was not mid-reply: {output}"
        assert result.returncode == 0, f"attempt {attempt}: exit {result.returncode}\n{output}"
        found = [bad for bad in BAD if bad in output or bad in log]
        assert not found, f"attempt {attempt}: {found}\n{output}\n{log}"
        assert " ERROR " not in log, log


def test_sigterm_mid_reply_closes_like_quit(user_dirs: Path) -> None:
    """Logging out (SIGTERM) killed Python at once: the next start asked the crash question
    and the partial reply was found "Interrupted" instead of kept as closed."""
    from app.chat_controller import CLOSED
    from app.chat_store import ChatStore

    result, _log = quit_after(0.6, "sigterm")
    output = result.stdout + result.stderr
    assert "QUIT generating=True" in result.stdout, output
    assert result.returncode == 0, f"exit {result.returncode}: {output}"
    assert not (user_dirs / "config" / "running").exists(), "a clean exit removes the marker"
    store = ChatStore(user_dirs / "data" / "chats.sqlite3")
    try:
        reply = store.load(store.list_conversations()[0].id).active_path()[-1]
    finally:
        store.close()
    assert reply.role == "assistant" and CLOSED in reply.note and reply.content
