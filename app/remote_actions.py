"""Models menu additions: remote engines (Add remote…, the saved ones, Use local engine) and
the local server switch.

A remote engine replaces the in-process engine behind the window's ``EngineBridge``; the rest
of the window does not know the difference, except that the model's "folder" is a stable
pseudo-folder under the config folder (so per-model settings work) and the live panel says
when offload telemetry is not available. The app connects to nothing until the user adds or
picks a remote engine, or turns the server on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu

from app.remote_dialog import RemoteDialog
from app.remote_engine import RemoteEngine, RemoteSpec
from app.remote_store import KeyStore, RemoteEntry, RemoteStore
from app.server_switch import ServerSwitch
from app.settings import ModelSettings, SettingsError, to_live_options, to_load_config
from engine.config import LoadConfig
from engine.events import ModelInfo
from engine.paths import builtin_model_dir
from engine.protocol import EngineAPI

if TYPE_CHECKING:
    from app.main_window import MainWindow

NO_TELEMETRY = "Offload telemetry is not available from this remote server (it is not Understudy)."


def remote_dir(config_dir: Path, entry: RemoteEntry) -> Path:
    """The pseudo-folder that keys a remote model's settings (never created)."""
    return config_dir / "remotes" / (re.sub(r"[^A-Za-z0-9._-]+", "_", entry.name) or "remote")


def remote_load_config(model_dir: Path, settings: ModelSettings, force: bool = False) -> LoadConfig:
    """A remote "load" needs no folder: only the live options travel."""
    return LoadConfig(model_dir=model_dir, live=to_live_options(settings))


class RemoteActions(QObject):
    """Owns the remote engine (when one is in use) and the server switch of a main window."""

    def __init__(
        self, window: MainWindow, keys: KeyStore | None = None, store: RemoteStore | None = None
    ) -> None:
        super().__init__(window)
        self.window = window
        self.config_dir = window.settings_store.config_dir
        self.store = store or RemoteStore(self.config_dir)
        self.keys = keys or KeyStore()
        self.local_engine: EngineAPI = window.bridge.engine
        self.local_dir = window.model_dir
        self.remote: RemoteEngine | None = None
        self.active: RemoteEntry | None = None
        self.server = ServerSwitch(window)
        self.dialog: RemoteDialog | None = None
        window.loader.loaded.connect(self._loaded)
        self._resume()

    # menu -------------------------------------------------------------------------------

    def install_menu(self, menu: QMenu) -> None:
        menu.addSeparator()
        menu.addAction("Add remote…").triggered.connect(self.ask_remote)
        self.remotes_menu = menu.addMenu("Remote engines")
        self.remotes_menu.aboutToShow.connect(self._fill_remotes)
        menu.addAction("Use local engine").triggered.connect(self.back_to_local)
        menu.addSeparator()
        self.server_action = QAction("Serve on this computer (OpenAI API)", menu)
        self.server_action.setCheckable(True)
        self.server_action.toggled.connect(self.server.set_on)
        self.server.changed.connect(self._server_changed)
        menu.addAction(self.server_action)

    def _fill_remotes(self) -> None:
        self.remotes_menu.clear()
        entries = self.store.load()
        if not entries:
            self.remotes_menu.addAction("(none yet: Add remote…)").setEnabled(False)
        for entry in entries:
            action = self.remotes_menu.addAction(
                f"{entry.name} ({entry.model} at {entry.base_url})"
            )
            action.triggered.connect(lambda _=False, e=entry: self.use_remote(e))
        if entries:
            forget = self.remotes_menu.addMenu("Forget")
            for entry in entries:
                action = forget.addAction(entry.name)
                action.triggered.connect(lambda _=False, e=entry: self.forget(e))

    def forget(self, entry: RemoteEntry) -> None:
        """Remove a saved remote and its key; back to the local engine if it is in use."""
        if self.active is not None and self.active.name == entry.name:
            self.back_to_local()
        try:
            self.store.remove(entry.name)
        except SettingsError as error:
            self.window.banner.show_message(str(error), "error")
            return
        self.keys.delete(entry.key_id)
        self.window.banner.show_message(f"Forgot the remote engine {entry.name!r}.", "info")

    def _server_changed(self, on: bool) -> None:
        if self.server_action.isChecked() != on:
            self.server_action.setChecked(on)

    # remote engines ---------------------------------------------------------------------

    def ask_remote(self, entry: RemoteEntry | None = None) -> RemoteDialog:
        self.dialog = RemoteDialog(self.window, entry)
        self.dialog.accepted_entry.connect(self.add_remote)
        self.dialog.show()
        return self.dialog

    def add_remote(self, entry: RemoteEntry, key: str) -> None:
        """Save the entry (the key goes to the keyring) and switch to it."""
        try:
            self.store.save(entry)
        except SettingsError as error:
            self.window.banner.show_message(str(error), "error")
            return
        if key:
            note = self.keys.store(entry.key_id, key)
            if note:
                self.window.banner.show_message(note, "warning")
        self.use_remote(entry)

    def use_remote(self, entry: RemoteEntry) -> None:
        key = self.keys.get(entry.key_id) if entry.has_key else None
        if entry.has_key and key is None:
            self.ask_remote(entry)  # the key was kept for an earlier session only
            return
        self._activate(entry, key)
        self.window.load_model()

    def _activate(self, entry: RemoteEntry, key: str | None) -> None:
        self.server.set_on(False)
        if self.remote is None and self.window.model_dir.parent != self.config_dir / "remotes":
            self.local_dir = self.window.model_dir
        self._drop_remote()
        self.local_engine.unload()  # its memory is free while the remote one answers
        spec = RemoteSpec(entry.base_url, entry.model, key)
        self.remote = RemoteEngine(spec, folder_inspector=self.local_engine.inspect)
        self.active = entry
        w = self.window
        w.bridge.engine = self.remote
        w.loader.make_config = remote_load_config
        w.model_dir = remote_dir(self.config_dir, entry)
        w.model_settings = w.settings_store.load_model(w.model_dir)
        w.panel.engine_note = NO_TELEMETRY

    def use_local(self) -> None:
        """Back to the in-process engine (before a local model loads)."""
        if self.remote is None:
            return
        self._drop_remote()
        w = self.window
        w.bridge.engine = self.local_engine
        w.loader.make_config = to_load_config
        w.panel.engine_note = None

    def back_to_local(self) -> None:
        if self.remote is None:
            return
        self.use_local()
        self.window.switch_model(str(self.local_dir))

    def _drop_remote(self) -> None:
        remote, self.remote, self.active = self.remote, None, None
        if remote is not None:
            if self.window.controller.generating:
                self.window.controller.stop()
            remote.shutdown()

    def _resume(self) -> None:
        """The last model was a remote one: use it again (nothing connects until it loads)."""
        w = self.window
        for entry in self.store.load():
            if remote_dir(self.config_dir, entry) != w.model_dir:
                continue
            self.local_dir = builtin_model_dir()
            key = self.keys.get(entry.key_id) if entry.has_key else None
            if entry.has_key and key is None:
                w.model_dir = self.local_dir
                w.model_settings = w.settings_store.load_model(w.model_dir)
                w.settings_store.warnings.append(
                    f"The API key of the remote engine {entry.name!r} was kept for the last "
                    "session only: pick it in Model > Remote engines to enter it again."
                )
                return
            self._activate(entry, key)
            return
        if w.model_dir.parent == self.config_dir / "remotes":  # forgotten since: no dead end
            gone, w.model_dir = w.model_dir.name, builtin_model_dir()
            w.model_settings = w.settings_store.load_model(w.model_dir)
            w.missing_notice = (
                f"The last remote engine ({gone}) is no longer saved; loaded "
                f"{w.model_dir.name} instead."
            )

    def _loaded(self, info: ModelInfo) -> None:
        if self.remote is not None:
            self.window.panel.engine_note = None if self.remote.understudy else NO_TELEMETRY
        self.server.restart()

    def close(self) -> None:
        self.server.stop()
        self._drop_remote()
