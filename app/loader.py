"""Loading a model in the background: check, estimate, then load with progress and Cancel.

The folder is inspected first (its config read) and the memory estimated, both before the
engine unloads the model it has: a broken folder fails there and the working model stays.
``unloaded_previous`` says whether a failure came after that point. Settings the model cannot
generate with (a context past its maximum, no room for the prompt) are lowered first and
``settings_adjusted`` says how. A load whose estimate does not fit stops at
``needs_confirmation`` until the user chooses "Load anyway" (``force=True``). Errors become a
message that says what to change.
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
        return f"{error}\nChoose another model folder (Models menu)."
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

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, model_dir: Path, settings: ModelSettings, force: bool = False) -> None:
        self.model_dir, self.settings = model_dir, settings
        self.unloaded_previous = False
        self.task = start_task(self, self._run(model_dir, settings, force), self.bridge.loop)

    def cancel(self) -> None:
        if self.events is not None and self.events.job is not None:
            self.events.job.cancel()

    async def _run(self, model_dir: Path, settings: ModelSettings, force: bool) -> None:
        try:
            if self.make_config is to_load_config:  # a local folder: check it before unloading
                info = await self.bridge.inspect(model_dir)  # a broken folder fails here
                settings = self._fitted(settings, info)
            config = self.make_config(model_dir, settings, force)
            estimate = await self.bridge.estimate(config)
            self.estimated.emit(estimate)
            if not estimate.fits and not force:
                self.needs_confirmation.emit(estimate)
                return
            self.unloaded_previous = True  # the engine unloads before loading
            await self._load(self.bridge.load(config))
        except CancelledError:
            self.cancelled.emit()
        except InsufficientMemoryError as error:
            log.info("load refused: %s", error)
            self.failed.emit(advice_for(error, settings))
        except Exception as error:
            log.exception("loading %s failed", model_dir)
            self.failed.emit(advice_for(error, settings))
        finally:
            self.events = None

    def _fitted(self, settings: ModelSettings, info: ModelInfo) -> ModelSettings:
        fitted, note = fit_to_model(settings, info.max_context)
        if note:
            self.settings = fitted
            self.settings_adjusted.emit(fitted, note)
        return fitted

    async def _load(self, events: JobEvents) -> None:
        self.events = events
        info: ModelInfo | None = None
        async for event in events:
            if isinstance(event, LoadProgressed):
                self.progressed.emit(event.fraction, event.message)
            elif isinstance(event, LoadFinished):
                info = event.info
        if info is None and events.job is not None:
            info = events.job.future.result()  # the job's result, if no LoadFinished came
        if info is not None:
            self.loaded.emit(info)
