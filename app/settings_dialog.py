"""Per-model settings: device, expert-cache budget with what fits, method switches, context,
sampling, system prompt and chat template (its rendering errors shown).

Settings marked ⟳ need a reload; the window that opens this dialog applies them by reloading.
The dialog is non-modal and emits ``saved`` with a validated ``ModelSettings``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.bridge import EngineBridge
from app.loader import describe_estimate
from app.settings import RELOAD_FIELDS, ModelSettings, to_load_config
from app.settings_check import fit_to_model, generation_problem
from app.tasks import start_task
from engine.config import (
    ALPHA_MAX,
    DEVICES,
    EXPERT_QUANTS,
    POLICIES,
    CacheConfig,
    ChatMessage,
    GenerateRequest,
)
from engine.events import MemoryEstimate, ModelInfo

RELOAD_MARK = " ⟳"
WIDE_INT = 2_000_000_000  # spin boxes accept what is typed; Save says what is out of range
WIDE_FLOAT = 1_000_000.0
DEFAULT_SIZE = (680, 620)
SAMPLE_CHAT = (ChatMessage("system", "You are helpful."), ChatMessage("user", "Hello!"))


def experts_line(slots: int, total: int) -> str:
    return f"The expert cache holds {slots} of {total} experts ({slots / max(1, total):.0%})."


def experts_that_fit(info: ModelInfo, budget_gb: float | None) -> str:
    """A guess from the checkpoint's bytes per expert, for when the engine gives no estimate."""
    total = info.moe_layers * info.experts_per_layer
    return experts_line(
        CacheConfig(budget_gb=budget_gb).slots_for(total, info.bytes_per_expert), total
    )


def estimated_fit(estimate: MemoryEstimate, info: ModelInfo | None, budget_gb: float | None) -> str:
    """The cache line from the engine's estimate: its slots count quantized experts (int8/int4)
    or the decoded ones a CPU cache holds; the checkpoint guess only where it has no count."""
    if estimate.total_experts:
        return experts_line(estimate.expert_slots, estimate.total_experts)
    return experts_that_fit(info, budget_gb) if info is not None else ""


def spin(low: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    """A number box that keeps every digit typed; the settings check judges the value."""
    box = QDoubleSpinBox()
    box.setRange(low, WIDE_FLOAT)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    return box


def int_spin(low: int, step: int = 1) -> QSpinBox:
    """A whole-number box that keeps every digit typed (Qt drops digits past the maximum)."""
    box = QSpinBox()
    box.setRange(low, WIDE_INT)
    box.setSingleStep(step)
    return box


class SettingsDialog(QDialog):
    saved = Signal(object)  # ModelSettings

    def __init__(
        self,
        settings: ModelSettings,
        model_dir: Path,
        info: ModelInfo | None,
        bridge: EngineBridge | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Settings for {model_dir.name}")
        self.original, self.model_dir, self.info, self.bridge = settings, model_dir, info, bridge
        self.task: asyncio.Task[None] | None = None
        self._make_widgets()
        self._layout()
        self.show_settings(settings)
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(300)
        self._estimate_timer.timeout.connect(self.update_fit)
        for box in (self.budget, self.context):
            box.valueChanged.connect(self._estimate_timer.start)
        self.device.currentTextChanged.connect(self._estimate_timer.start)
        self.expert_quant.currentTextChanged.connect(self._estimate_timer.start)
        self.mmap_experts.toggled.connect(self._estimate_timer.start)
        for box in (self.context, self.max_tokens):
            box.valueChanged.connect(self.check)

    def check(self) -> bool:
        """Say at once what keeps the shown settings from saving; True when nothing does."""
        try:
            self.current()
        except ValueError as error:
            self.error_label.setText(f"Cannot save yet: {error}")
            return False
        self.error_label.setText("")
        return True

    def _make_widgets(self) -> None:
        self.device = QComboBox()
        self.device.addItems(list(DEVICES))
        self.expert_quant = QComboBox()
        self.expert_quant.addItems(list(EXPERT_QUANTS))
        self.expert_quant.setToolTip(
            "Keep the experts as int8 or int4 blocks in RAM and on the GPU (smaller, faster "
            "to copy, slightly less exact). GGUF files are already quantized."
        )
        if self.info is not None and self.info.expert_quant:
            self.expert_quant.clear()  # a GGUF file: show the file's own block types
            self.expert_quant.addItem(f"{self.info.expert_quant}, as stored in the file")
            self.expert_quant.setEnabled(False)
        self.mmap_experts = QCheckBox("Read experts from the mapped file instead of RAM")
        self.mmap_experts.setToolTip(
            "For models bigger than RAM: the experts stay in the model file (or, with quantized "
            "experts, in their cache file) and the system's page cache keeps the recent ones."
        )
        self.budget = spin(0.0, 0.5)
        self.budget.setSpecialValueText("default (half of the experts)")
        self.budget.setSuffix(" GB")
        self.fit_label = QLabel()
        self.fit_label.setWordWrap(True)
        self.policy = QComboBox()
        self.policy.addItems(list(POLICIES))
        self.alpha = spin(0.0, 0.05)
        self.alpha.setMaximum(ALPHA_MAX)
        self.prefetch = QCheckBox("Prefetch the experts the next layer will likely need")
        self.cpu_assist = QCheckBox("Run some missing experts on the CPU instead of copying")
        self.context = int_spin(16, 256)
        self.context_hint = QLabel(self._context_hint())
        self.temperature = spin(0.0, 0.05)
        self.top_p = spin(0.0, 0.05)
        self.top_k = int_spin(0)
        self.repetition = spin(0.0, 0.05)
        self.max_tokens = int_spin(1, 64)
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.system_prompt = QPlainTextEdit()
        self.template = QPlainTextEdit()
        self.template.setPlaceholderText("Empty: use the model's own chat template")
        self.preview_button = QPushButton("Preview template")
        self.preview_button.clicked.connect(self.start_preview)
        self.template_status = QLabel()
        self.template_status.setWordWrap(True)
        self.preview = QPlainTextEdit()
        self.preview.setReadOnly(True)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #c0392b;")

    @property
    def max_context(self) -> int | None:
        return self.info.max_context if self.info is not None and self.info.max_context else None

    def _context_hint(self) -> str:
        most = self.max_context
        return f"this model: up to {most}" if most else "the model's maximum is not known yet"

    def _with_hint(self, box: QWidget, hint: QLabel) -> QWidget:
        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(box, 1)
        layout.addWidget(hint)
        return row

    def _form(self, rows: list[tuple[str, str, QWidget]]) -> QWidget:
        page = QWidget()
        form = QFormLayout(page)
        for field_name, label, widget in rows:
            reload = field_name in RELOAD_FIELDS
            title = QLabel(label + (RELOAD_MARK if reload else ""))
            if reload:
                title.setToolTip("Changing this reloads the model.")
            form.addRow(title, widget)
        return page

    def _pages(self) -> QTabWidget:
        model = self._form(
            [
                ("device", "Device", self.device),
                ("expert_quant", "Quantize experts", self.expert_quant),
                ("mmap_experts", "", self.mmap_experts),
                ("cache_budget_gb", "Expert-cache budget", self.budget),
                ("", "", self.fit_label),
                (
                    "context_length",
                    "Context length (tokens)",
                    self._with_hint(self.context, self.context_hint),
                ),
                ("policy", "Cache policy", self.policy),
                ("alpha", "Importance α", self.alpha),
                ("prefetch", "", self.prefetch),
                ("cpu_assist", "", self.cpu_assist),
            ]
        )
        sampling = self._form(
            [
                ("temperature", "Temperature", self.temperature),
                ("top_p", "Top-p", self.top_p),
                ("top_k", "Top-k (0: off)", self.top_k),
                ("repetition_penalty", "Repetition penalty", self.repetition),
                ("max_new_tokens", "Max reply tokens", self.max_tokens),
            ]
        )
        prompt = self._form(
            [
                ("system_prompt", "Default system prompt", self.system_prompt),
                ("chat_template", "Chat template override", self.template),
                ("", "", self.preview_button),
                ("", "", self.template_status),
                ("", "Rendered", self.preview),
            ]
        )
        tabs = self.tabs = QTabWidget()
        for page, title in (
            (model, "Model"),
            (sampling, "Sampling"),
            (prompt, "Prompt and template"),
        ):
            tabs.addTab(page, title)
        return tabs

    def _layout(self) -> None:
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self._pages())
        layout.addWidget(QLabel(f"{RELOAD_MARK.strip()} applied by reloading the model"))
        layout.addWidget(self.notice)
        layout.addWidget(self.error_label)
        self.resize(*DEFAULT_SIZE)
        layout.addWidget(buttons)

    def show_settings(self, settings: ModelSettings) -> None:
        """Show ``settings``, first lowered to what the model can generate with (said why)."""
        s, note = fit_to_model(settings, self.max_context)
        self.notice.setText(note)
        self.notice.setVisible(bool(note))
        self.device.setCurrentText(s.device)
        self.expert_quant.setCurrentText(s.expert_quant)
        self.mmap_experts.setChecked(s.mmap_experts)
        self.budget.setValue(s.cache_budget_gb or 0.0)
        self.policy.setCurrentText(s.policy)
        self.alpha.setValue(s.alpha)
        self.prefetch.setChecked(s.prefetch)
        self.cpu_assist.setChecked(s.cpu_assist)
        self.context.setValue(s.context_length)
        self.temperature.setValue(s.temperature)
        self.top_p.setValue(s.top_p)
        self.top_k.setValue(s.top_k)
        self.repetition.setValue(s.repetition_penalty)
        self.max_tokens.setValue(s.max_new_tokens)
        self.system_prompt.setPlainText(s.system_prompt)
        self.template.setPlainText(s.chat_template or "")
        self._show_fit_from_info()

    def current(self) -> ModelSettings:
        """The settings as shown; raises ``ValueError`` with a message when invalid."""
        settings = self._shown()
        problem = generation_problem(settings, self.max_context)
        if problem:
            raise ValueError(problem)
        return settings

    def _shown(self) -> ModelSettings:
        template = self.template.toPlainText()
        return replace(
            self.original,
            device=self.device.currentText(),
            expert_quant=self._expert_quant(),
            mmap_experts=self.mmap_experts.isChecked(),
            cache_budget_gb=self.budget.value() or None,
            policy=self.policy.currentText(),
            alpha=round(self.alpha.value(), 4),
            prefetch=self.prefetch.isChecked(),
            cpu_assist=self.cpu_assist.isChecked(),
            context_length=self.context.value(),
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            top_k=self.top_k.value(),
            repetition_penalty=self.repetition.value(),
            max_new_tokens=self.max_tokens.value(),
            system_prompt=self.system_prompt.toPlainText(),
            chat_template=template if template.strip() else None,
        )

    def _expert_quant(self) -> str:
        """The scheme chosen; a GGUF file's box only shows the file's own block types."""
        if self.expert_quant.isEnabled():
            return self.expert_quant.currentText()
        return self.original.expert_quant

    def accept(self) -> None:
        try:
            settings = self.current()
        except ValueError as error:
            self.error_label.setText(f"Not saved: {error}")
            return
        self.saved.emit(settings)
        super().accept()

    def _show_fit_from_info(self) -> None:
        """Without an engine, the checkpoint guess; with one, the last estimate stays shown
        until the next (the guess ignores Quantize experts and the CPU's decoded slots)."""
        if self.info is not None and self.bridge is None:
            self.fit_label.setText(experts_that_fit(self.info, self.budget.value() or None))
        elif self.bridge is not None and not self.fit_label.text():
            self.fit_label.setText("Estimating what fits…")

    def update_fit(self) -> None:
        """Re-estimate memory for the budget and context shown (async, via the engine)."""
        self._show_fit_from_info()
        if self.bridge is not None:
            self.task = start_task(self, self._estimate(), self.bridge.loop)

    async def _estimate(self) -> None:
        assert self.bridge is not None, "checked in update_fit"
        try:
            estimate = await self.bridge.estimate(to_load_config(self.model_dir, self._shown()))
        except Exception as error:
            self.fit_label.setText(f"Cannot estimate memory: {error}")
            return
        fit = estimated_fit(estimate, self.info, self.budget.value() or None)
        self.fit_label.setText(f"{fit}\n{describe_estimate(estimate)}".strip())

    def start_preview(self) -> None:
        if self.bridge is None:
            self.template_status.setText("Load a model to preview its chat template.")
            return
        self.task = start_task(self, self._preview(), self.bridge.loop)

    async def _preview(self) -> None:
        assert self.bridge is not None, "checked in start_preview"
        template = self.template.toPlainText()
        request = GenerateRequest(
            messages=SAMPLE_CHAT, chat_template=template if template.strip() else None
        )
        try:
            text = await self.bridge.render_chat(request)
        except Exception as error:
            self.template_status.setText(f"Template error: {error}")
            self.template_status.setStyleSheet("color: #c0392b;")
            self.preview.clear()
            return
        self.template_status.setText("The template renders.")
        self.template_status.setStyleSheet("color: #2e7d32;")
        self.preview.setPlainText(text)
