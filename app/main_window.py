"""The main window: chat list, chat, importance slider and live panel, menus and shortcuts.

It wires the widgets to the chat controller, the model loader and the settings store; the
logic itself lives in those (``chat_controller``, ``loader``, ``settings``). The engine is
reached only through ``EngineBridge``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QRect, QSize, QStandardPaths, Qt, Signal
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QGuiApplication,
    QKeySequence,
    QShortcut,
)
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
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
from app.chat_controller import WAIT_FOR_LOADING, ChatController, RequestOptions
from app.chat_store import ChatStore
from app.chat_view import ChatView
from app.composer import Composer
from app.conversation_list import ConversationList
from app.crash_guard import CrashGuard
from app.export import default_export_path, export_to
from app.library_dialog import LibraryDialog
from app.load_dialog import LoadDialog
from app.loader import ModelLoader
from app.model_library import all_models, startup_model
from app.panel import LivePanel
from app.remote_actions import RemoteActions
from app.settings import (
    THEMES,
    AppPrefs,
    ModelSettings,
    SettingsError,
    SettingsStore,
    to_live_options,
    to_load_config,
    to_sampling,
)
from app.settings_dialog import SettingsDialog
from app.slider import ImportanceSlider, Measurer
from app.telemetry import GpuTelemetry
from engine.errors import EngineError
from engine.events import GenerationFinished, ModelInfo, StatsSnapshot
from engine.paths import builtin_model_dir, builtin_notice

log = logging.getLogger(__name__)
OTHER_MODELS = "other-models"  # the picker's last entry: opens the Models window
RECOVERY_QUESTION = (
    "Understudy did not close properly last time. Load the last settings that worked?"
)


def documents_folder() -> Path:
    """The user's documents folder (home when the platform has none)."""
    location = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
    folder = Path(location) if location else Path.home()
    return folder if folder.is_dir() else Path.home()


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
        self.model_dir, self.missing_notice = startup_model(
            self.prefs.last_model, settings_store.config_dir / "remotes"
        )
        self.model_settings: ModelSettings = settings_store.load_model(self.model_dir)
        self.model_info: ModelInfo | None = None
        self.working: tuple[Path, ModelSettings] | None = None  # loaded model and its settings
        self.restoring = False  # loading ``working`` again after a failed switch
        self.pending_notice: tuple[str, str] | None = None  # "Loading X instead" -> "X was loaded"
        self.ready_status = ""  # the last ``ready`` status ("loaded" or the error shown)
        self.dialogs: dict[str, QWidget] = {}
        self._closed = False  # set by closeEvent: late engine callbacks touch nothing stored
        self._build(telemetry, measure)
        self.remote = RemoteActions(self)  # remote engines and the server switch (issue 13)
        self._menus()
        self.remote.install_menu(self.menus["&Model"])
        self._shortcuts()
        self._connect()
        self.fill_model_picker()
        self.banner.return_focus = self.composer.text
        QGuiApplication.styleHints().colorSchemeChanged.connect(self._system_theme_changed)
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
        self.model_label = QLabel()  # "Loading …" next to the picker while a model loads
        self.model_picker = QComboBox()
        self.model_picker.setToolTip("The model replies come from; choose another to load it")
        # one width whatever it lists ("Loading …", a long name): the header does not jump
        self.model_picker.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.model_picker.setMinimumContentsLength(26)
        self.model_picker.activated.connect(self._model_picked)
        self.controller = ChatController(self.chat_store, self.chat_view, self.request_options)
        self.controller.bridge = self.bridge
        self.loader = ModelLoader(self.bridge)
        self.load_dialog = LoadDialog(self.loader, self)
        self.panel = LivePanel(telemetry, self._engine_stats, lambda: self.controller.timing)
        self.setCentralWidget(self._splitter())

    def _splitter(self) -> QSplitter:
        header = QHBoxLayout()
        header.addWidget(self.model_picker)
        header.addWidget(self.model_label)
        header.addSpacing(12)
        header.addWidget(self.system_prompt, 1)
        center = QWidget()
        column = QVBoxLayout(center)
        column.setContentsMargins(10, 8, 10, 8)
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
        self._theme_actions()
        self._action("&View", "Larger text", lambda: self.change_font(1), "Ctrl++")
        self._action("&View", "Smaller text", lambda: self.change_font(-1), "Ctrl+-")
        self._action("&View", "Show/hide live panel", self.toggle_panel)
        self._action("&Help", "About Understudy", self.show_about)

    def _theme_actions(self) -> None:
        """System / Light / Dark as one exclusive, checked group in the View menu."""
        self.theme_group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for theme in THEMES:
            title = "Follow the system theme" if theme == "system" else f"{theme.title()} theme"
            action = self._action("&View", title, lambda _=False, t=theme: self.set_theme(t))
            action.setCheckable(True)
            self.theme_group.addAction(action)
            self.theme_actions[theme] = action
        self.menus["&View"].addSeparator()

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
        c.error_occurred.connect(self._chat_error)
        c.generation_failed.connect(self._generation_failed)
        c.conversations_changed.connect(self.sidebar.refresh)
        self.loader.loaded.connect(self._loaded)
        self.loader.failed.connect(self._load_failed)
        self.loader.cancelled.connect(self._load_cancelled)
        self.loader.settings_adjusted.connect(self._settings_adjusted)
        self.load_dialog.load_anyway.connect(self._load_anyway)
        self.load_dialog.declined.connect(self._load_declined)
        self.load_dialog.settings_requested.connect(self.show_settings)
        self.load_dialog.mmap_requested.connect(self._use_mapped_experts)

    # start-up ---------------------------------------------------------------------------

    def start(self, crash_guard: CrashGuard | None, auto_recover: bool = False) -> None:
        """Show stored warnings, open the last chat, then load (or offer crash recovery)."""
        for warning in (*self.settings_store.warnings, self.chat_store.recovery_message):
            if warning:
                self.banner.show_message(warning, "warning")
        notice = builtin_notice()
        if notice and self.model_dir == builtin_model_dir():
            self.banner.show_message(notice, "info")
        if self.missing_notice:
            self.banner.show_message(self.missing_notice, "warning")
        self._open_latest_chat()
        crashed = crash_guard.start() if crash_guard is not None else False
        last = self.settings_store.load_last_working() if crashed else None
        if last is None:
            self.load_model()
        elif auto_recover:
            self.use_last_working()
        else:
            self.controller.not_ready_reason = RECOVERY_QUESTION
            self.offer_recovery()

    def offer_recovery(self) -> None:
        """Ask which settings to load after a crash (again, if Send was tried meanwhile)."""
        self.banner.show_message(
            RECOVERY_QUESTION,
            "warning",
            (
                ("Use last working settings", self.use_last_working),
                ("Load current settings", self.load_model),
            ),
        )

    def _chat_error(self, text: str) -> None:
        if text == RECOVERY_QUESTION:
            self.offer_recovery()  # keep the choice on screen: nothing loads until it is made
        else:
            self.banner.show_message(text, "warning")

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
        self.controller.not_ready_reason = WAIT_FOR_LOADING
        self._show_loading(self.model_dir.name)
        self.slider.set_loading(self.model_dir.name)
        self.load_dialog.begin(self.model_dir.name)
        self.loader.start(self.model_dir, self.model_settings, force)

    def reload_model(self) -> None:
        self.load_model()

    def switch_model(self, model_dir: str) -> None:
        self.remote.use_local()
        self.model_dir = Path(model_dir)
        self.model_settings = self.settings_store.load_model(self.model_dir)
        self.load_model()

    def _loaded(self, info: ModelInfo) -> None:
        self.model_info, self.working = info, (self.model_dir, self.model_settings)
        self.controller.ready = True
        self._show_model(info)
        self._show_slider(info)
        if self.banner.text == WAIT_FOR_LOADING:
            self.banner.dismiss()
        self._loaded_instead()
        self.restoring = False
        try:
            self.prefs = self.settings_store.remember_model(self.model_dir)
            self.settings_store.save_last_working(self.model_dir, self.model_settings)
        except SettingsError as error:
            self.banner.show_message(str(error), "warning")
        self.panel.update_readings()
        self._report_ready("loaded")

    def _show_slider(self, info: ModelInfo) -> None:
        self.slider.set_model(
            self.model_dir, info.name, info.substitution_supported, self.model_settings.expert_quant
        )
        self.slider.set_alpha(self.model_settings.alpha)

    def _loading_instead(self, why: str, verb: str) -> None:
        """Say why another model is loading; once it has loaded, ``_loaded_instead`` says so."""
        name = self.model_dir.name
        shown = f"{why}\nLoading {name} {verb}."
        self.banner.show_message(shown, "warning")
        self.pending_notice = (shown, f"{why}\n{name} was loaded {verb}.")

    def _loaded_instead(self) -> None:
        """The banner still says a model is loading in place of another: it has loaded."""
        if self.pending_notice is not None and self.banner.text == self.pending_notice[0]:
            self.banner.show_message(self.pending_notice[1], "warning")
        self.pending_notice = None

    def _show_model(self, info: ModelInfo | None) -> None:
        """Header label, window title and panel for the model the engine holds now."""
        self.model_label.setText("")  # the picker says which model, or "No model loaded"
        self.fill_model_picker()
        library = self.dialogs.get("library")
        if isinstance(library, LibraryDialog):  # an open Models window marks it too
            library.set_loaded(self.working[0] if self.working and info is not None else None)
        self._update_title()
        self.panel.update_readings()

    def _show_loading(self, name: str) -> None:
        """The picker says "Loading …" (a label beside it squeezed the system prompt field to
        its last words at 1280 px); the next fill_model_picker puts the models back."""
        picker = self.model_picker
        picker.blockSignals(True)
        picker.insertItem(0, f"Loading {name}…", "")
        picker.setCurrentIndex(0)
        picker.blockSignals(False)

    def fill_model_picker(self) -> None:
        """The library's models, the loaded one shown; "Other models…" opens the library."""
        loaded = self.working[0] if self.working and self.model_info else None
        picker = self.model_picker
        picker.blockSignals(True)
        picker.clear()
        for entry in all_models(self.prefs.model_folders, self.hf_cache):
            picker.addItem(entry.name, str(entry.path))
            if loaded is not None and entry.path.resolve() == loaded.resolve():
                picker.setCurrentIndex(picker.count() - 1)
        if loaded is None:
            picker.insertItem(0, "No model loaded", "")
            picker.setCurrentIndex(0)
        picker.insertSeparator(picker.count())
        picker.addItem("Other models…", OTHER_MODELS)
        picker.blockSignals(False)

    def _model_picked(self, index: int) -> None:
        target = self.model_picker.itemData(index)
        if target == OTHER_MODELS:
            self.fill_model_picker()  # show the loaded model again, then open the library
            self.show_library()
        elif target and (self.working is None or Path(target) != self.working[0]):
            self.switch_model(target)

    def _settings_adjusted(self, settings: ModelSettings, note: str) -> None:
        self.model_settings = settings
        if self._save_model_settings():
            self.banner.show_message(note, "info", (("Settings…", self.show_settings),))

    def _load_failed(self, message: str) -> None:
        failed = self.model_dir.name
        if self._still_loaded():
            self._keep_working(f"{failed} was not loaded: {message}")
        elif self.working is not None and not self.restoring:
            self._restore_working(f"{failed} could not be loaded: {message}")
        else:
            self._no_model(f"{failed} could not be loaded.")
            if not self._load_builtin_instead(f"{failed} could not be loaded: {message}"):
                self.banner.show_message(message, "error", (("Settings…", self.show_settings),))
        self._report_ready(message)

    def _load_builtin_instead(self, why: str) -> bool:
        """No model works yet (a broken last model at start): load the built-in one instead."""
        builtin = builtin_model_dir()
        local = self.loader.make_config is to_load_config
        if not local or self.model_dir.resolve() == builtin.resolve() or not builtin.is_dir():
            return False
        self.model_dir, self.model_settings = builtin, self.settings_store.load_model(builtin)
        self.load_model()
        self._loading_instead(why, "instead")
        return True

    def _still_loaded(self) -> bool:
        """The engine still holds the working model: the load stopped before unloading it
        (not so while the working model is being loaded again after a failure)."""
        return self.model_info is not None and not self.loader.unloaded_previous

    def _keep_working(self, why: str) -> None:
        """A load stopped before the engine let go of its model: keep using that one."""
        assert self.working is not None and self.model_info is not None, "a model is loaded"
        self.model_dir, self.model_settings = self.working
        self.controller.ready = True
        self._show_model(self.model_info)
        self._show_slider(self.model_info)
        self.load_dialog.hide()
        self.banner.show_message(
            f"{why}\n{self.model_info.name} is still loaded.",
            "warning",
            (("Settings…", self.show_settings),),
        )

    def _restore_working(self, why: str) -> None:
        """The engine had already unloaded the working model: load it again, as it was."""
        assert self.working is not None, "a model was loaded"
        self.model_dir, self.model_settings = self.working
        self._no_model(why)
        self.restoring = True
        self.load_model()
        self._loading_instead(why, "again")

    def _no_model(self, why: str) -> None:
        self.model_info = None
        self.controller.ready = False
        self.controller.not_ready_reason = (
            f"No model is loaded: {why} Choose one in Model > Models… or change its settings."
        )
        self._show_model(None)
        self.slider.set_model(None, "")

    def _load_anyway(self) -> None:
        self.load_dialog.awaiting_choice = False
        self.load_model(force=True)

    def _use_mapped_experts(self) -> None:
        """The experts do not fit in RAM: keep this choice and load reading them from the file."""
        self.load_dialog.awaiting_choice = False
        self.model_settings = replace(self.model_settings, mmap_experts=True)
        if self._save_model_settings():
            self.load_model()

    def _load_declined(self) -> None:
        """Closed at "does not fit": nothing was unloaded, so the working model stays."""
        if self.working is not None:
            self._keep_working(f"{self.model_dir.name} was not loaded (it does not fit).")
        else:
            self._no_model(f"{self.model_dir.name} does not fit with these settings.")

    def _load_cancelled(self) -> None:
        if self._still_loaded():
            self._keep_working("Loading was cancelled.")
        elif self.working is not None and not self.restoring:
            self._restore_working("Loading was cancelled.")
        else:
            self._no_model("loading was cancelled.")
            self.banner.show_message(
                "Loading was cancelled. Use Model > Reload to try again.", "info"
            )
        self._report_ready("Loading was cancelled.")

    def _report_ready(self, status: str) -> None:
        self.ready_status = status
        self.ready.emit(status)

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
        self.theme_actions[prefs.theme].setChecked(True)

    def _system_theme_changed(self) -> None:
        """The OS switched light/dark: follow it when the theme is "system"."""
        if self.prefs.theme == "system":
            self.apply_prefs(self.prefs)

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
            self.composer.set_stopping()
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
        if self._closed:  # a reply ended by closing: the chat store may already be closed
            return
        self.sidebar.refresh()
        if self.controller.conversation is not None:
            self.sidebar.select(self.controller.conversation.id)

    def _generation_failed(self, message: str) -> None:
        actions = (("Retry", self.regenerate), ("Settings…", self.show_settings))
        self.banner.show_message(message, "warning", actions)

    def export_current(self) -> None:
        if self.controller.conversation is not None:
            self.export_conversation(self.controller.conversation.id)

    def export_conversation(self, conversation_id: str, path: Path | None = None) -> None:
        conversation = self.chat_store.load(conversation_id)
        if path is None:
            suggested = default_export_path(conversation.title, documents_folder())
            name, _ = QFileDialog.getSaveFileName(
                self, "Export chat", str(suggested), "Markdown (*.md);;JSON (*.json)"
            )
            if not name:
                return
            path = Path(name)
        try:
            export_to(conversation, path)
        except (OSError, ValueError) as error:
            self.banner.show_message(f"Could not export the chat: {error}", "error")
            return
        self.banner.show_message(f"Exported to {path}.", "info")

    # other windows ----------------------------------------------------------------------

    def show_library(self) -> None:
        loaded = self.working[0] if self.working is not None else None
        dialog = LibraryDialog(
            self.bridge, self.prefs.model_folders, self.hf_cache, self, loaded=loaded
        )
        dialog.load_requested.connect(self.switch_model)
        dialog.folder_added.connect(self._folder_added)
        dialog.folder_removed.connect(self._folder_removed)
        self.dialogs["library"] = dialog
        dialog.show()
        dialog.rescan()

    def _folder_added(self, folder: str) -> None:
        folders = (*self.prefs.model_folders, folder)
        self._update_prefs(replace(self.prefs, model_folders=folders))
        self.fill_model_picker()

    def _folder_removed(self, folder: str) -> None:
        kept = tuple(
            p for p in self.prefs.model_folders if Path(p).resolve() != Path(folder).resolve()
        )
        self._update_prefs(replace(self.prefs, model_folders=kept))
        self.fill_model_picker()

    def show_about(self) -> None:
        dialog = AboutDialog(self)
        self.dialogs["about"] = dialog
        dialog.show()

    def toggle_panel(self) -> None:
        self.panel.setVisible(not self.panel.isVisible())

    def fit_to_screen(self, available: QRect) -> None:
        """Start no larger than the screen's free area (at 150% scaling a 1280x800 screen has
        853x533 logical pixels: the window ran off it); where even the smallest layout with
        the panel is too wide, start with the panel hidden (View > Panel brings it back)."""
        size = QSize(min(1280, available.width()), min(800, available.height()))
        smallest = self.minimumSizeHint()
        if smallest.width() > size.width() or smallest.height() > size.height():
            self.panel.setVisible(False)
            QApplication.sendPostedEvents()  # the splitter forgets the panel's width ...
            layout = self.layout()
            if layout is not None:  # ... and the window's minimum shrinks, before the resize
                layout.activate()
        self.resize(size)

    def _update_title(self) -> None:
        name = self.model_info.name if self.model_info else "no model"
        self.setWindowTitle(f"Understudy — {name}")

    def closeEvent(self, event: QCloseEvent) -> None:
        self._closed = True
        self.remote.close()
        self.controller.close()
        self.loader.cancel(notify=False)  # closing: no "cancelled" message, nothing reloads
        if self.slider.task is not None:  # a Measure in progress: end its child process
            self.slider.cancel_measure()
        for dialog in self.dialogs.values():
            dialog.close()
        self.load_dialog.close()
        super().closeEvent(event)
