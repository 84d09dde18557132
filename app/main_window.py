"""The main window: chat list, chat, importance slider and live panel, menus and shortcuts.

It wires the widgets to the chat controller, the model loader and the settings store; the
logic itself lives in those (``chat_controller``, ``loader``, ``settings``). The engine is
reached only through ``EngineBridge``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMenu,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.about_dialog import AboutDialog
from app.application import apply_theme
from app.banner import Banner
from app.bridge import EngineBridge
from app.chat_controller import ChatController, RequestOptions
from app.chat_store import ChatStore
from app.chat_view import ChatView
from app.composer import Composer
from app.conversation_list import ConversationList
from app.crash_guard import CrashGuard
from app.export import export_to
from app.library_dialog import LibraryDialog
from app.load_dialog import LoadDialog
from app.loader import ModelLoader
from app.panel import LivePanel
from app.settings import (
    AppPrefs,
    ModelSettings,
    SettingsError,
    SettingsStore,
    to_live_options,
    to_sampling,
)
from app.settings_dialog import SettingsDialog
from app.slider import ImportanceSlider, Measurer
from app.telemetry import GpuTelemetry
from engine.errors import EngineError
from engine.events import GenerationFinished, ModelInfo, StatsSnapshot
from engine.paths import builtin_model_dir, builtin_notice

log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    ready = Signal(str)  # "loaded" or the error shown; for --smoke-test and tests

    def __init__(
        self,
        bridge: EngineBridge,
        settings_store: SettingsStore,
        chat_store: ChatStore,
        telemetry: GpuTelemetry,
        measure: Measurer | None = None,
        hf_cache: Path | None = None,
    ) -> None:
        super().__init__()
        self.bridge, self.settings_store, self.chat_store = bridge, settings_store, chat_store
        self.hf_cache = hf_cache
        self.prefs: AppPrefs = settings_store.load_prefs()
        self.model_dir = (
            Path(self.prefs.last_model) if self.prefs.last_model else builtin_model_dir()
        )
        self.model_settings: ModelSettings = settings_store.load_model(self.model_dir)
        self.model_info: ModelInfo | None = None
        self.dialogs: dict[str, QWidget] = {}
        self._build(telemetry, measure)
        self._menus()
        self._shortcuts()
        self._connect()
        self.apply_prefs(self.prefs)
        self.resize(1280, 800)
        self._update_title()

    # construction -----------------------------------------------------------------------

    def _build(self, telemetry: GpuTelemetry, measure: Measurer | None) -> None:
        self.banner = Banner()
        self.sidebar = ConversationList(self.chat_store)
        self.chat_view = ChatView()
        self.composer = Composer()
        self.slider = ImportanceSlider(measure)
        self.system_prompt = QLineEdit()
        self.system_prompt.setPlaceholderText("System prompt for this chat")
        self.model_label = QLabel("No model loaded")
        self.controller = ChatController(self.chat_store, self.chat_view, self.request_options)
        self.controller.bridge = self.bridge
        self.loader = ModelLoader(self.bridge)
        self.load_dialog = LoadDialog(self.loader, self)
        self.panel = LivePanel(telemetry, self._engine_stats, lambda: self.controller.timing)
        self.setCentralWidget(self._splitter())

    def _splitter(self) -> QSplitter:
        header = QHBoxLayout()
        header.addWidget(self.model_label)
        header.addWidget(self.system_prompt, 1)
        center = QWidget()
        column = QVBoxLayout(center)
        column.addWidget(self.banner)
        column.addLayout(header)
        column.addWidget(self.slider)
        column.addWidget(self.chat_view, 1)
        column.addWidget(self.composer)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        for widget, stretch in ((self.sidebar, 0), (center, 1), (self.panel, 0)):
            splitter.addWidget(widget)
            splitter.setStretchFactor(splitter.count() - 1, stretch)
        splitter.setSizes([240, 760, 300])
        return splitter

    def _action(self, menu_name: str, title: str, slot: object, shortcut: str = "") -> QAction:
        menu = self.menus.get(menu_name) or self.menuBar().addMenu(menu_name)
        self.menus[menu_name] = menu
        action = menu.addAction(title)
        action.triggered.connect(slot)
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
        return action

    def _menus(self) -> None:
        self.menus: dict[str, QMenu] = {}
        self._action("&Chat", "New chat", self.new_chat, "Ctrl+N")
        self._action("&Chat", "Export chat…", self.export_current)
        self._action("&Chat", "Quit", self.close, "Ctrl+Q")
        self._action("&Model", "Models…", self.show_library)
        self._action("&Model", "Settings…", self.show_settings, "Ctrl+,")
        self._action("&Model", "Reload", self.reload_model)
        for theme in ("system", "light", "dark"):
            self._action(
                "&View", f"{theme.title()} theme", lambda _=False, t=theme: self.set_theme(t)
            )
        self._action("&View", "Larger text", lambda: self.change_font(1), "Ctrl++")
        self._action("&View", "Smaller text", lambda: self.change_font(-1), "Ctrl+-")
        self._action("&View", "Show/hide live panel", self.toggle_panel)
        self._action("&Help", "About Understudy", self.show_about)

    def _shortcuts(self) -> None:
        bindings = {
            "Esc": self.stop,
            "Ctrl+Return": self.regenerate,
            "Ctrl+Enter": self.regenerate,
            "Ctrl+F": self.focus_search,
        }
        self.shortcuts = []
        for keys, slot in bindings.items():
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(slot)
            self.shortcuts.append(shortcut)

    def _connect(self) -> None:
        self.composer.send_requested.connect(self.send)
        self.composer.edit_submitted.connect(self.submit_edit)
        self.composer.stop_requested.connect(self.stop)
        self.composer.regenerate_requested.connect(self.regenerate)
        self.chat_view.edit_requested.connect(self.begin_edit)
        self.sidebar.conversation_chosen.connect(self.open_conversation)
        self.sidebar.new_requested.connect(self.new_chat)
        self.sidebar.export_requested.connect(self.export_conversation)
        self.sidebar.deleted.connect(self._conversation_deleted)
        self.system_prompt.editingFinished.connect(self._system_prompt_edited)
        self.slider.alpha_changed.connect(self.set_alpha)
        c = self.controller
        c.generation_started.connect(self._generation_started)
        c.generation_finished.connect(self._generation_finished)
        c.error_occurred.connect(lambda text: self.banner.show_message(text, "warning"))
        c.conversations_changed.connect(self.sidebar.refresh)
        self.loader.loaded.connect(self._loaded)
        self.loader.failed.connect(self._load_failed)
        self.loader.cancelled.connect(self._load_cancelled)
        self.load_dialog.load_anyway.connect(lambda: self.load_model(force=True))
        self.load_dialog.settings_requested.connect(self.show_settings)

    # start-up ---------------------------------------------------------------------------

    def start(self, crash_guard: CrashGuard | None, auto_recover: bool = False) -> None:
        """Show stored warnings, open the last chat, then load (or offer crash recovery)."""
        for warning in (*self.settings_store.warnings, self.chat_store.recovery_message):
            if warning:
                self.banner.show_message(warning, "warning")
        notice = builtin_notice()
        if notice and self.model_dir == builtin_model_dir():
            self.banner.show_message(notice, "info")
        self._open_latest_chat()
        crashed = crash_guard.start() if crash_guard is not None else False
        last = self.settings_store.load_last_working() if crashed else None
        if last is None:
            self.load_model()
        elif auto_recover:
            self.use_last_working()
        else:
            self.banner.show_message(
                "Understudy did not close properly last time. Load the last settings that worked?",
                "warning",
                (
                    ("Use last working settings", self.use_last_working),
                    ("Load current settings", self.load_model),
                ),
            )

    def use_last_working(self) -> None:
        last = self.settings_store.load_last_working()
        if last is not None:
            self.model_dir, self.model_settings = Path(last.model_dir), last.settings
            self._save_model_settings()
        self.load_model()

    def _open_latest_chat(self) -> None:
        self.sidebar.refresh()
        chats = self.chat_store.list_conversations()
        if chats:
            self.open_conversation(chats[0].id)
        else:
            self.new_chat()

    # model ------------------------------------------------------------------------------

    def load_model(self, force: bool = False) -> None:
        if self.controller.generating:
            self.controller.stop()
        self.controller.ready = False
        self.model_label.setText(f"Loading {self.model_dir.name}…")
        self.load_dialog.begin(self.model_dir.name)
        self.loader.start(self.model_dir, self.model_settings, force)

    def reload_model(self) -> None:
        self.load_model()

    def switch_model(self, model_dir: str) -> None:
        self.model_dir = Path(model_dir)
        self.model_settings = self.settings_store.load_model(self.model_dir)
        self.load_model()

    def _loaded(self, info: ModelInfo) -> None:
        self.model_info = info
        self.controller.ready = True
        self.model_label.setText(f"<b>{info.name}</b>")
        self.slider.set_model(self.model_dir, info.name, info.substitution_supported)
        self.slider.set_alpha(self.model_settings.alpha)
        self._update_title()
        try:
            self.prefs = self.settings_store.remember_model(self.model_dir)
            self.settings_store.save_last_working(self.model_dir, self.model_settings)
        except SettingsError as error:
            self.banner.show_message(str(error), "warning")
        self.panel.update_readings()
        self.ready.emit("loaded")

    def _load_failed(self, message: str) -> None:
        self.model_label.setText("No model loaded")
        self.banner.show_message(message, "error", (("Settings…", self.show_settings),))
        self.ready.emit(message)

    def _load_cancelled(self) -> None:
        self.model_label.setText("No model loaded (loading cancelled)")
        self.banner.show_message("Loading was cancelled. Use Model > Reload to try again.", "info")
        self.ready.emit("Loading was cancelled.")

    def _engine_stats(self) -> StatsSnapshot | None:
        return self.bridge.stats() if self.controller.ready else None

    def request_options(self) -> RequestOptions:
        s = self.model_settings
        return RequestOptions(to_sampling(s), s.chat_template, s.context_length)

    # settings ---------------------------------------------------------------------------

    def show_settings(self) -> None:
        dialog = SettingsDialog(
            self.model_settings, self.model_dir, self.model_info, self.bridge, self
        )
        dialog.saved.connect(self.apply_model_settings)
        self.dialogs["settings"] = dialog
        dialog.show()
        dialog.update_fit()

    def apply_model_settings(self, settings: ModelSettings) -> None:
        """Save; apply live options at once; reload when a ⟳ setting changed."""
        old, self.model_settings = self.model_settings, settings
        if not self._save_model_settings():
            return
        self.slider.set_alpha(settings.alpha)
        if settings.needs_reload(old) or not self.controller.ready:
            self.load_model()
        else:
            self._apply_live(old)

    def _save_model_settings(self) -> bool:
        try:
            self.settings_store.save_model(self.model_dir, self.model_settings)
        except SettingsError as error:
            self.banner.show_message(str(error), "error")
            return False
        return True

    def set_alpha(self, alpha: float) -> None:
        old, self.model_settings = self.model_settings, replace(self.model_settings, alpha=alpha)
        if not self.controller.ready or self._apply_live(old):
            self._save_model_settings()

    def _apply_live(self, previous: ModelSettings) -> bool:
        """Send policy/alpha to the engine; on refusal say why and go back to ``previous``."""
        try:
            self.bridge.set_live_options(to_live_options(self.model_settings))
        except EngineError as error:
            self.banner.show_message(str(error), "warning")
            self.model_settings = replace(
                self.model_settings, alpha=previous.alpha, policy=previous.policy
            )
            self.slider.set_alpha(previous.alpha)
            self._save_model_settings()
            return False
        return True

    def apply_prefs(self, prefs: AppPrefs) -> None:
        app = QApplication.instance()
        if isinstance(app, QApplication):
            self.chat_view.set_html_palette(apply_theme(app, prefs.theme, prefs.font_size))

    def _update_prefs(self, prefs: AppPrefs) -> None:
        self.prefs = prefs
        self.apply_prefs(prefs)
        try:
            self.settings_store.save_prefs(prefs)
        except SettingsError as error:
            self.banner.show_message(str(error), "error")

    def set_theme(self, theme: str) -> None:
        self._update_prefs(replace(self.prefs, theme=theme))

    def change_font(self, step: int) -> None:
        size = max(6, min(40, self.prefs.font_size + step))
        self._update_prefs(replace(self.prefs, font_size=size))

    # chat -------------------------------------------------------------------------------

    def new_chat(self) -> None:
        if self.controller.generating:
            self.banner.show_message("Stop the current reply before starting a new chat.", "info")
            return
        current = self.controller.conversation
        if current is not None and not current.messages:
            self.composer.text.setFocus()  # the open chat is still empty: use it
            return
        conversation = self.controller.new_conversation(self.model_settings.system_prompt)
        self.system_prompt.setText(conversation.system_prompt)
        self.sidebar.refresh()
        self.sidebar.select(conversation.id)
        self.composer.text.setFocus()

    def open_conversation(self, conversation_id: str) -> None:
        if self.controller.generating:
            return
        self.controller.open(conversation_id)
        assert self.controller.conversation is not None, "open() sets the chat"
        self.system_prompt.setText(self.controller.conversation.system_prompt)
        self.sidebar.select(conversation_id)

    def _conversation_deleted(self, conversation_id: str) -> None:
        current = self.controller.conversation
        if current is not None and current.id == conversation_id:
            self._open_latest_chat()

    def _system_prompt_edited(self) -> None:
        self.controller.set_system_prompt(self.system_prompt.text())

    def send(self, text: str) -> None:
        if not self.controller.send(text):
            self.composer.text.setPlainText(text)

    def submit_edit(self, message_id: str, text: str) -> None:
        if not self.controller.edit(message_id, text):
            self.composer.begin_edit(message_id, text)

    def begin_edit(self, message_id: str) -> None:
        conversation = self.controller.conversation
        if conversation is not None and not self.controller.generating:
            self.composer.begin_edit(message_id, conversation.messages[message_id].content)

    def stop(self) -> None:
        if self.controller.generating:
            self.controller.stop()
        elif self.composer.editing_id is not None:
            self.composer.cancel_edit()
        elif self.loader.busy:
            self.loader.cancel()

    def regenerate(self) -> None:
        self.controller.regenerate()

    def focus_search(self) -> None:
        self.sidebar.search.setFocus()
        self.sidebar.search.selectAll()

    def _generation_started(self) -> None:
        self.composer.set_generating(True)
        self.bridge.reset_stats()
        self.panel.set_generating(True)

    def _generation_finished(self, finished: GenerationFinished | None) -> None:
        self.composer.set_generating(False)
        self.panel.set_generating(False)
        self.sidebar.refresh()
        if self.controller.conversation is not None:
            self.sidebar.select(self.controller.conversation.id)

    def export_current(self) -> None:
        if self.controller.conversation is not None:
            self.export_conversation(self.controller.conversation.id)

    def export_conversation(self, conversation_id: str, path: Path | None = None) -> None:
        if path is None:
            name, _ = QFileDialog.getSaveFileName(
                self, "Export chat", "chat.md", "Markdown (*.md);;JSON (*.json)"
            )
            if not name:
                return
            path = Path(name)
        try:
            export_to(self.chat_store.load(conversation_id), path)
        except (OSError, ValueError) as error:
            self.banner.show_message(f"Could not export the chat: {error}", "error")
            return
        self.banner.show_message(f"Exported to {path}.", "info")

    # other windows ----------------------------------------------------------------------

    def show_library(self) -> None:
        dialog = LibraryDialog(self.bridge, self.prefs.model_folders, self.hf_cache, self)
        dialog.load_requested.connect(self.switch_model)
        dialog.folder_added.connect(self._folder_added)
        self.dialogs["library"] = dialog
        dialog.show()
        dialog.rescan()

    def _folder_added(self, folder: str) -> None:
        folders = (*self.prefs.model_folders, folder)
        self._update_prefs(replace(self.prefs, model_folders=folders))

    def show_about(self) -> None:
        dialog = AboutDialog(self)
        self.dialogs["about"] = dialog
        dialog.show()

    def toggle_panel(self) -> None:
        self.panel.setVisible(not self.panel.isVisible())

    def _update_title(self) -> None:
        name = self.model_info.name if self.model_info else "no model"
        self.setWindowTitle(f"Understudy — {name}")

    def closeEvent(self, event: QCloseEvent) -> None:
        self.controller.stop()
        self.loader.cancel()
        for dialog in self.dialogs.values():
            dialog.close()
        self.load_dialog.close()
        super().closeEvent(event)
