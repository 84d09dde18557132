"""The local server switch: serve the app's loaded model over the OpenAI API on loopback.

Off by default (the app opens no port unless the user turns this on). While on, the status
bar shows the URL and the queue: requests in progress and waiting. The server shares the app's
engine: a chat reply and a server request run one at a time on the engine's thread.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QLabel

from app.settings import to_live_options
from engine.errors import EngineError, InvalidRequestError
from engine.server import ServedModel, ServerConfig, ServerHandle
from engine.server.config import DEFAULT_PORT

if TYPE_CHECKING:
    from app.main_window import MainWindow

REFRESH_MS = 500
PORT_TRIES = 10


class ServerSwitch(QObject):
    """Starts and stops a ``ServerHandle`` over the window's engine; ``changed(on)``."""

    changed = Signal(bool)

    def __init__(self, window: MainWindow, port: int = DEFAULT_PORT) -> None:
        super().__init__(window)
        self.window, self.port = window, port
        self.handle: ServerHandle | None = None
        self.announced = ""  # the banner line saying what is served, while it is true
        self.label = QLabel()
        self.label.setTextInteractionFlags(self.label.textInteractionFlags().TextSelectableByMouse)
        window.statusBar().addPermanentWidget(self.label)
        self.label.hide()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.refresh)

    @property
    def on(self) -> bool:
        return self.handle is not None

    def served_model(self) -> ServedModel | None:
        w = self.window
        if not w.controller.ready or w.model_info is None:
            return None
        return ServedModel(
            model_id=w.model_info.name,
            context_length=w.model_settings.context_length,
            substitution_supported=w.model_info.substitution_supported,
            live=to_live_options(w.model_settings),
            created=int(time.time()),
        )

    def set_on(self, on: bool) -> None:
        if on and not self.on:
            self.start()
        elif not on and self.on:
            self.stop()

    def start(self) -> None:
        model = self.served_model()
        if model is None:
            self._refuse("Load a model first; then the server can serve it.")
            return
        if self.window.model_info is not None and self.window.model_info.model_type == "remote":
            self._refuse("The server serves a model loaded in this app, not a remote engine.")
            return
        try:
            self.handle = self._listen(model).start()
        except EngineError as error:
            self._refuse(f"The server could not start: {error}")
            return
        self.label.show()
        self.timer.start(REFRESH_MS)
        self.refresh()
        self.announced = f"Serving {model.model_id} on {self.handle.url} (this computer only)."
        self.window.banner.show_message(self.announced, "info")
        self.changed.emit(True)

    def _listen(self, model: ServedModel) -> ServerHandle:
        """The first free port of ``port`` and the next few (another app may hold 8080)."""
        ports = [self.port] if self.port == 0 else list(range(self.port, self.port + PORT_TRIES))
        for port in ports:
            try:
                return ServerHandle(self.window.bridge.engine, model, ServerConfig(port=port))
            except InvalidRequestError as error:
                failure = error
        raise InvalidRequestError(
            f"Ports {ports[0]}-{ports[-1]} are all in use on this computer ({failure})."
        )

    def _refuse(self, message: str) -> None:
        self.window.banner.show_message(message, "warning")
        self.changed.emit(False)

    def stop(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.stop()
        self.timer.stop()
        self.label.hide()
        if self.announced and self.window.banner.text == self.announced:
            self.window.banner.dismiss()  # it no longer serves: the line would mislead
        self.announced = ""
        self.changed.emit(False)

    def restart(self) -> None:
        """A new model loaded: serve that one (the id and context may differ)."""
        if self.on:
            self.stop()
            self.start()

    def status_text(self) -> str:
        if self.handle is None:
            return ""
        state = self.handle.routes.gate.state()
        text = f"Server on: {self.handle.url} · {state.running} answering, {state.waiting} waiting"
        if state.running and self.window.controller.generating:
            text += " · chat and server take turns on the engine"
        return text

    def refresh(self) -> None:
        """The status line, and the alpha/policy the server reports, kept current."""
        self.label.setText(self.status_text())
        if self.handle is not None:
            live = to_live_options(self.window.model_settings)
            served = self.handle.routes.served
            if served.live != live:
                self.handle.routes.served = replace(served, live=live)
