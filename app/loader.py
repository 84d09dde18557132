"""Loading a model in the background: check, estimate, then load with progress and Cancel.

The folder is inspected first (its config read) and the memory estimated, both before the
engine unloads the model it has: a broken folder fails there and the working model stays.
``unloaded_previous`` says whether a failure came after that point. Settings the model cannot
generate with (a context past its maximum, no room for the prompt) are lowered first and
``settings_adjusted`` says how. A load whose estimate does not fit stops at
``needs_confirmation`` until the user chooses "Load anyway" (``force=True``). Errors become a
message that says what to change.

Cancel answers at once: ``cancelled`` is emitted when the user asks, not when the engine
stops. The engine checks its cancel flag only between stages and tensors (a transformers
trunk load cannot be interrupted), so the cancelled run is abandoned rather than awaited: it
emits nothing more, and if its load completes anyway its model is unloaded (a load started
since, such as reloading the previous model, replaces it on the engine thread instead).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.bridge import EngineBridge, JobEvents
from app.model_library import human_bytes
from app.settings import ModelSettings, to_load_config
from app.settings_check import fit_to_model
from app.tasks import start_task
from engine.config import LoadConfig
from engine.errors import (
    CacheBudgetError,
    CancelledError,
    EngineError,
    EngineOutOfMemoryError,
    InsufficientMemoryError,
    ModelLoadError,
)
from engine.events import LoadFinished, LoadProgressed, MemoryEstimate, ModelInfo

log = logging.getLogger(__name__)


def describe_estimate(estimate: MemoryEstimate) -> str:
    """The memory estimate in words, as shown before loading."""
    free = estimate.device_free_bytes
    device = (
        f"{estimate.device.upper()} memory: needs {human_bytes(estimate.device_bytes)} "
        f"(model trunk {human_bytes(estimate.trunk_bytes)}"
        f" + context {human_bytes(estimate.kv_cache_bytes)}"
        f" + expert cache {human_bytes(estimate.expert_cache_bytes)}), "
        f"{'free: unknown' if free is None else human_bytes(free) + ' free'}."
    )
    host_free = estimate.host_free_bytes
    host = (
        f"Host RAM for the experts: {human_bytes(estimate.host_expert_bytes)}, "
        f"{'free: unknown' if host_free is None else human_bytes(host_free) + ' free'}."
    )
    verdict = "It fits." if estimate.fits else "It does NOT fit with these settings."
    return f"{device}\n{host}\n{verdict}"


def device_is_short(estimate: MemoryEstimate) -> bool:
    """The trunk, context and expert cache need more device memory than is free."""
    free = estimate.device_free_bytes
    return free is not None and estimate.device_bytes > free


def ram_is_short(estimate: MemoryEstimate) -> bool:
    """The experts' copy in RAM does not fit: reading them from the model file would help."""
    free = estimate.host_free_bytes
    return free is not None and estimate.host_expert_bytes > free


def shortfall_advice(estimate: MemoryEstimate) -> str:
    """What the loading window says when the estimate does not fit: what to change."""
    advice = []
    if device_is_short(estimate):
        cpu = "" if estimate.device == "cpu" else ", or choose the CPU as device"
        advice.append(
            f"Not enough {estimate.device.upper()} memory: in Settings, lower the expert-cache "
            f"budget or the context length{cpu}."
        )
    if ram_is_short(estimate):
        advice.append(
            f"The experts need {human_bytes(estimate.host_expert_bytes)} of RAM but only "
            f"{human_bytes(estimate.host_free_bytes)} is free: read them from the model file "
            "instead (the experts used lately stay in memory, the others are read from disk)."
        )
    return " ".join(advice or ["The estimate says this will not fit."]) + (
        " Loading anyway may run out of memory."
    )


def what_to_change(settings: ModelSettings) -> str:
    budget = "the default" if settings.cache_budget_gb is None else f"{settings.cache_budget_gb} GB"
    return (
        f"Open Settings (Ctrl+,) and lower the expert-cache budget (now {budget}), shorten the "
        f"context length (now {settings.context_length} tokens), or choose the CPU as device."
    )


def advice_for(error: BaseException, settings: ModelSettings) -> str:
    """A message for a failed load that says what went wrong and what to change."""
    if isinstance(error, EngineOutOfMemoryError | InsufficientMemoryError):
        return f"Out of memory while loading: {error}\n{what_to_change(settings)}"
    if isinstance(error, CacheBudgetError):
        return (
            f"{error}\nOpen Settings (Ctrl+,) and raise the expert-cache budget to at least "
            f"{human_bytes(error.minimum_bytes)} ({error.minimum_slots} experts)."
        )
    if isinstance(error, ModelLoadError):
        return f"{error}\nChoose another model (Model > Models…)."
    if isinstance(error, EngineError):
        return str(error)
    return f"Loading failed unexpectedly: {error!r}. Details are in the log file."


class ModelLoader(QObject):
    estimated = Signal(object)  # MemoryEstimate
    needs_confirmation = Signal(object)  # MemoryEstimate that does not fit
    progressed = Signal(float, str)
    loaded = Signal(object)  # ModelInfo
    failed = Signal(str)
    cancelled = Signal()
    settings_adjusted = Signal(object, str)  # ModelSettings, what was changed and why

    def __init__(self, bridge: EngineBridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.events: JobEvents | None = None
        self.task: asyncio.Task[None] | None = None
        self.model_dir: Path | None = None
        self.settings = ModelSettings()
        # settings -> LoadConfig; a remote engine swaps in one that needs no model folder
        self.make_config: Callable[[Path, ModelSettings, bool], LoadConfig] = to_load_config
        self.unloaded_previous = False  # the engine dropped its model for this load
        self.run_id = 0  # the current run; a cancelled or replaced run has an older one
        self._abandoned: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """A load runs that the user still waits for (an abandoned one does not count)."""
        return self.task is not None and not self.task.done()

    def start(self, model_dir: Path, settings: ModelSettings, force: bool = False) -> None:
        self.model_dir, self.settings = model_dir, settings
        self.unloaded_previous = False
        self.run_id += 1
        self.events = None
        run = self._run(model_dir, settings, force, self.run_id)
        self.task = start_task(self, run, self.bridge.loop)

    def cancel(self, notify: bool = True) -> None:
        """Stop waiting now: the engine is asked to stop, ``cancelled`` is emitted at once
        (unless ``notify`` is False: the window is closing)."""
        if not self.busy:
            return
        if self.events is not None and self.events.job is not None:
            self.events.job.cancel()
        self.run_id += 1  # the running one is abandoned: it reports nothing more
        if self.task is not None:  # kept referenced until it ends (the loop holds tasks weakly)
            self._abandoned.add(self.task)
            self.task.add_done_callback(self._abandoned.discard)
        self.task = None
        self.events = None
        if notify:
            self.cancelled.emit()

    def _current(self, run_id: int) -> bool:
        return run_id == self.run_id

    async def _run(self, model_dir: Path, settings: ModelSettings, force: bool, run: int) -> None:
        try:
            await self._stages(model_dir, settings, force, run)
        except CancelledError:
            if self._current(run):
                self.cancelled.emit()
        except InsufficientMemoryError as error:
            log.info("load refused: %s", error)
            if self._current(run):
                self.failed.emit(advice_for(error, settings))
        except Exception as error:
            log.exception("loading %s failed", model_dir)
            if self._current(run):
                self.failed.emit(advice_for(error, settings))
        finally:
            if self._current(run):
                self.events = None

    async def _stages(
        self, model_dir: Path, settings: ModelSettings, force: bool, run: int
    ) -> None:
        """Inspect, estimate, load; an abandoned run stops before the engine unloads anything."""
        if self.make_config is to_load_config:  # a local folder: check it before unloading
            info = await self.bridge.inspect(model_dir)  # a broken folder fails here
            if not self._current(run):
                return
            settings = self._fitted(settings, info)
        config = self.make_config(model_dir, settings, force)
        estimate = await self.bridge.estimate(config)
        if not self._current(run):
            return
        self.estimated.emit(estimate)
        if not estimate.fits and not force:
            self.needs_confirmation.emit(estimate)
            return
        self.unloaded_previous = True  # the engine unloads before loading
        events = self.events = self.bridge.load(config)
        loaded = await self._load(events, run)
        if loaded is not None and self._current(run):
            self.loaded.emit(loaded)
        elif loaded is not None and self.run_id == run + 1 and not self.busy:
            await self.bridge.unload()  # cancelled, yet it loaded, and nothing replaced it

    def _fitted(self, settings: ModelSettings, info: ModelInfo) -> ModelSettings:
        fitted, note = fit_to_model(settings, info.max_context)
        if note:
            self.settings = fitted
            self.settings_adjusted.emit(fitted, note)
        return fitted

    async def _load(self, events: JobEvents, run: int) -> ModelInfo | None:
        """Follow the load's events (progress only while it is the current run)."""
        info: ModelInfo | None = None
        async for event in events:
            if isinstance(event, LoadProgressed) and self._current(run):
                self.progressed.emit(event.fraction, event.message)
            elif isinstance(event, LoadFinished):
                info = event.info
        if info is None and events.job is not None:
            info = events.job.future.result()  # the job's result, if no LoadFinished came
        return info
