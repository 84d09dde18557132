"""DEMO ONLY: a scripted, torch-free stand-in for the engine (screenshots, ``--demo``).

It implements ``engine.protocol.EngineAPI`` on its own thread like the real engine, but it runs
no model: replies come from a script, split into word tokens with a delay, and the cache
counters are made up from the alpha setting so the panel has something to plot. Nothing here
is a measurement. The tests' fake engine builds on it.
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from app.stats_box import StatsBox
from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import CancelledError, InsufficientMemoryError, InvalidRequestError
from engine.events import (
    GenerationFinished,
    LoadFinished,
    LoadProgressed,
    MemoryEstimate,
    ModelInfo,
    StatsSnapshot,
    TokenReceived,
)
from engine.protocol import EventSink, Job, run_job

GB = 1_000_000_000
TOKEN = re.compile(r"\s*\S+|\s+")
DEMO_REPLY = (
    "Here is a small example of **expert offloading** in Python:\n\n"
    "```python\ndef pick_experts(scores, k=2):\n"
    "    # keep the k experts with the highest router score\n"
    "    return sorted(range(len(scores)), key=scores.__getitem__)[-k:]\n```\n\n"
    "With the importance slider above 0, low-importance experts that miss the cache are "
    "replaced by a similar expert already on the GPU, so fewer bytes cross PCIe per token."
)


def demo_info(path: Path) -> ModelInfo:
    return ModelInfo(
        path=str(path),
        name=path.name or "demo-model",
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        num_layers=8,
        moe_layers=8,
        experts_per_layer=8,
        top_k=2,
        bytes_per_expert=48_000_000,
        trunk_bytes=int(0.9 * GB),
        total_expert_bytes=8 * 8 * 48_000_000,
        vocab_size=32000,
        max_context=4096,
        router_family="mixtral",
        substitution_supported=True,
    )


class DemoEngine:
    """A scripted engine on its own thread. Not a model: for screenshots and UI tests."""

    def __init__(
        self,
        replies: Sequence[str] = (DEMO_REPLY,),
        token_delay: float = 0.02,
        load_steps: int = 5,
        load_delay: float = 0.02,
        device_free_bytes: int | None = 8 * GB,
    ) -> None:
        self.replies: Iterator[str] = itertools.cycle(replies)
        self.token_delay = token_delay
        self.load_steps = load_steps
        self.load_delay = load_delay
        self.device_free_bytes = device_free_bytes
        self.host_free_bytes: int | None = 32 * GB
        self.live = LiveOptions()
        self.loaded: ModelInfo | None = None
        self.config: LoadConfig | None = None
        self._lock = threading.Lock()  # loaded model, config and live options
        self._stats = StatsBox()
        self._jobs: queue.Queue[tuple[Job[Any], Callable[[Job[Any]], Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="demo-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, work = item
            run_job(job, lambda job=job, work=work: work(job))  # type: ignore[misc]

    def _submit(self, work: Callable[[Job[Any]], Any]) -> Job[Any]:
        job: Job[Any] = Job()
        self._jobs.put((job, work))
        return job

    def model_info(self, path: Path) -> ModelInfo:
        return demo_info(path)

    def inspect(self, model_dir: Path) -> Job[ModelInfo]:
        return self._submit(lambda job: self.model_info(Path(model_dir)))

    def compute_estimate(self, config: LoadConfig) -> MemoryEstimate:
        info = self.model_info(config.model_dir)
        total = info.moe_layers * info.experts_per_layer
        slots = config.cache.slots_for(total, info.bytes_per_expert)
        return MemoryEstimate(
            device="cpu" if config.device == "cpu" else "cuda",
            trunk_bytes=info.trunk_bytes,
            kv_cache_bytes=config.context_length * info.num_layers * 2 * 4096,
            expert_cache_bytes=slots * info.bytes_per_expert,
            host_expert_bytes=0 if config.mmap_experts else info.total_expert_bytes,
            device_free_bytes=self.device_free_bytes,
            host_free_bytes=self.host_free_bytes,
            expert_slots=slots,
            total_experts=total,
        )

    def estimate(self, config: LoadConfig) -> Job[MemoryEstimate]:
        return self._submit(lambda job: self.compute_estimate(config))

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        return self._submit(lambda job: self._load(job, config, on_event))

    def _load(self, job: Job[Any], config: LoadConfig, on_event: EventSink) -> ModelInfo:
        estimate = self.compute_estimate(config)
        if not estimate.fits and not config.force:
            raise InsufficientMemoryError(
                "The model does not fit in GPU memory with these settings.",
                estimate.device_bytes,
                estimate.device_free_bytes or 0,
            )
        for step in range(self.load_steps):
            if job.cancel_requested:
                raise CancelledError("Loading was cancelled; nothing was changed.")
            on_event(LoadProgressed(step / self.load_steps, f"Loading layer {step + 1}"))
            time.sleep(self.load_delay)
        info = self.model_info(config.model_dir)
        with self._lock:
            self.loaded, self.config, self.live = info, config, config.live
        slots = estimate.expert_cache_bytes // info.bytes_per_expert
        cache_bytes = estimate.expert_cache_bytes
        self._stats.change(lambda s: replace(s, cache_slots=slots, cache_bytes=cache_bytes))
        on_event(LoadProgressed(1.0, "Ready"))
        on_event(LoadFinished(info, estimate))
        return info

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        return self._submit(lambda job: self._generate(job, request, on_event))

    def next_reply(self, request: GenerateRequest) -> str:
        return next(self.replies)

    def dropped_for(self, request: GenerateRequest) -> int:
        """Oldest messages left out so the prompt fits the context (4 characters a token)."""
        limit = (self.config.context_length if self.config else 2048) * 4
        sizes = [len(m.content) for m in request.messages if m.role != "system"]
        dropped = 0
        while sum(sizes[dropped:]) > limit and dropped < len(sizes) - 1:
            dropped += 1
        return dropped

    def _generate(self, job: Job[Any], request: GenerateRequest, on_event: EventSink) -> Any:
        if self.loaded is None:
            raise InvalidRequestError("No model is loaded.")
        pieces = TOKEN.findall(self.next_reply(request))[: request.sampling.max_new_tokens]
        started, first, text, ids = time.perf_counter(), 0.0, "", []
        for index, piece in enumerate(pieces):
            if job.cancel_requested:
                break
            time.sleep(self.token_delay)
            first = first or time.perf_counter() - started
            text += piece
            ids.append(index)
            self._count_token(first, len(ids) / (time.perf_counter() - started))
            on_event(TokenReceived(piece, index))
        reason: Literal["stop", "length", "cancelled"] = "stop"
        if job.cancel_requested:
            reason = "cancelled"
        elif len(pieces) == request.sampling.max_new_tokens:
            reason = "length"
        prompt_tokens = sum(len(m.content) for m in request.messages) // 4
        finished = GenerationFinished(
            text, tuple(ids), reason, self.stats(), prompt_tokens, self.dropped_for(request)
        )
        on_event(finished)
        return finished

    def _count_token(self, first_token_s: float, tokens_per_second: float) -> None:
        with self._lock:
            live = self.live
        self._stats.change(lambda s: counted(s, live, first_token_s, tokens_per_second))

    def set_live_options(self, live: LiveOptions) -> None:
        with self._lock:
            self.live = live

    def stats(self) -> StatsSnapshot:
        return self._stats.get()

    def reset_stats(self) -> None:
        self._stats.change(
            lambda s: StatsSnapshot(cache_slots=s.cache_slots, cache_bytes=s.cache_bytes)
        )

    def render_chat(self, request: GenerateRequest) -> Job[str]:
        return self._submit(lambda job: render_template(request))

    def unload(self) -> Job[None]:
        return self._submit(lambda job: self._unload())

    def _unload(self) -> None:
        with self._lock:
            self.loaded = None

    def shutdown(self) -> None:
        """Finish the queued jobs and end the thread (so no event is posted during exit)."""
        self._jobs.put(None)
        self._thread.join(5)


def counted(
    s: StatsSnapshot, live: LiveOptions, first_token_s: float, tokens_per_second: float
) -> StatsSnapshot:
    """One more made-up token: a higher alpha turns misses into substitutions."""
    substituted = round(4 * live.alpha / 0.6) if live.substitution_on else 0
    misses = 4 - substituted
    return replace(
        s,
        tokens=s.tokens + 1,
        hits=s.hits + 12,
        misses=s.misses + misses,
        substitutions=s.substitutions + substituted,
        transfers=s.transfers + misses,
        bytes_moved=s.bytes_moved + misses * 48_000_000,
        tokens_per_second=tokens_per_second,
        time_to_first_token_s=first_token_s,
        bytes_per_token_history=(*s.bytes_per_token_history, misses * 48_000_000)[-256:],
    )


def render_template(request: GenerateRequest) -> str:
    """ChatML, or the request's Jinja template (its errors become ``InvalidRequestError``)."""
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    if request.chat_template is None:
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"
    import jinja2

    try:
        template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            request.chat_template
        )
        return template.render(messages=messages, add_generation_prompt=True)
    except jinja2.TemplateError as error:
        raise InvalidRequestError(f"The chat template does not render: {error}") from error
