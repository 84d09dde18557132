"""Running the server: uvicorn on a socket bound here, in the foreground or on a thread.

Binding the socket ourselves reports a taken port at once, in words, and lets port 0 pick a
free one (tests, the app). ``ServerHandle`` runs uvicorn on its own thread and event loop, so
the app's Qt loop and the tests' code stay free; ``stop`` asks it to finish and joins it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from engine.errors import InvalidRequestError
from engine.protocol import EngineAPI
from engine.server.config import ServedModel, ServerConfig
from engine.server.http_app import Routes, create_app

log = logging.getLogger(__name__)
STOP_GRACE_S = 2


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a clear error when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise InvalidRequestError(
            f"Cannot listen on {host}:{port} ({error.strerror or error}): "
            "is another server using that port? Pick another with --port."
        ) from error
    sock.listen(128)
    return sock


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/v1"


def uvicorn_server(app: Starlette, log_level: str = "warning") -> uvicorn.Server:
    settings = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        lifespan="off",
        timeout_graceful_shutdown=STOP_GRACE_S,
    )
    return uvicorn.Server(settings)


def serve_forever(
    engine: EngineAPI,
    model: ServedModel,
    config: ServerConfig,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serve in the foreground until interrupted (the CLI); on ``sock`` when given."""
    sock = sock if sock is not None else bind(config.host, config.port)
    server = uvicorn_server(create_app(engine, model, config), log_level)
    server.run(sockets=[sock])


class ServerHandle:
    """A server running on a background thread; ``url`` once started, ``stop`` to end it."""

    def __init__(self, engine: EngineAPI, model: ServedModel, config: ServerConfig) -> None:
        self.config = config
        self._socket = bind(config.host, config.port)
        self.port: int = self._socket.getsockname()[1]
        self.url = url_of(config.host, self.port)
        app = create_app(engine, model, config)
        self.routes: Routes = app.state.routes
        self._server = uvicorn_server(app)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self._thread = threading.Thread(target=self._run, name="understudy-server", daemon=True)

    def start(self, timeout: float = 10.0) -> ServerHandle:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout * 100)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            raise InvalidRequestError(f"The server did not start on {self.url}.")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            log.exception("the server stopped with an error")

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[self._socket])

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def connections(self) -> int:
        """Client connections open now."""
        return len(self._server.server_state.connections)

    def loop_cpu_s(self, timeout: float = 5.0) -> float:
        """CPU time the server's thread (its event loop: HTTP, JSON, SSE) has used so far."""

        async def cpu() -> float:
            return time.thread_time()

        assert self.loop is not None, "the server runs"
        return asyncio.run_coroutine_threadsafe(cpu(), self.loop).result(timeout)

    def tasks(self, timeout: float = 5.0) -> int:
        """Tasks alive on the server's event loop (connections, handlers), asked on that loop."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this question's own task

        assert self.loop is not None, "the server runs"
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
