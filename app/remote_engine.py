"""An ``EngineAPI`` that talks to an OpenAI-compatible server (vLLM, SGLang, llama-server,
Ollama, or another Understudy) instead of running a model in this process.

Work runs on the remote engine's own thread, in order, like the local engine's; events reach
``on_event`` on that thread. ``generate`` streams ``/v1/chat/completions`` (or
``/v1/completions`` for a raw prompt) and turns each content delta into a ``TokenReceived``;
cancelling the job closes the stream, which the server sees as a disconnect. When the server
is an Understudy one (it answers ``/v1/understudy/stats``) the alpha and policy are sent
under ``understudy`` and the offload counters come back; otherwise only speed is known.
The API key is sent as a Bearer header and never logged. No torch here.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from app.stats_box import StatsBox
from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import EngineError, InvalidRequestError, ModelLoadError
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

log = logging.getLogger(__name__)
TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)
REMOTE_ARCHITECTURE = "remote (OpenAI-compatible server)"


class RemoteError(EngineError):
    """The remote server failed, refused, or answered something that is not OpenAI's API."""


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1/`` -> ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url or 'The address'} is not an http:// or https:// address")
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass(frozen=True)
class RemoteSpec:
    """Where the server is and which model to ask for; the key is held only in memory."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        if not self.model.strip():
            raise ValueError("Give the model name the server knows (see its /v1/models)")


class RemoteJob(Job[Any]):
    """A job whose cancel also closes the open stream, so a blocked read ends at once."""

    def __init__(self) -> None:
        super().__init__()
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.on_cancel is not None:
            self.on_cancel()


def describe_http_error(response: httpx.Response) -> str:
    """The server's own error message when it sent OpenAI error JSON, else the status."""
    try:
        data = json.loads(response.read() or b"{}")
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        message = None
    if response.status_code in (401, 403):
        hint = "the server refused the API key (check it in Model > Add remote…)"
        return f"{hint}: {message}" if message else hint
    return message or f"HTTP {response.status_code} {response.reason_phrase}"


def sse_data(lines: Iterator[str]) -> Iterator[Any]:
    """The JSON of each ``data:`` event until ``[DONE]``; other lines are skipped."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError as error:
            raise RemoteError(
                f"The server sent a stream event that is not JSON: {payload[:80]!r}"
            ) from error


@dataclass
class StreamState:
    """What one streamed reply has told so far."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    text: str = ""
    pieces: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    extras: dict[str, Any] | None = None

    def add(self, piece: str) -> None:
        self.first_token_s = self.first_token_s or time.perf_counter() - self.started
        self.text += piece
        self.pieces += 1


def delta_text(chunk: Any, chat: bool) -> str:
    """The text a chunk adds; a malformed chunk is a ``RemoteError``."""
    if not isinstance(chunk, dict):
        raise RemoteError("The server sent a stream event that is not a JSON object.")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise RemoteError(f"The server reported an error: {message}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise RemoteError("The server sent a stream event without 'choices'.")
    if not choices:
        return ""
    choice = choices[0]
    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    if piece is not None and not isinstance(piece, str):
        raise RemoteError("The server sent content that is not text.")
    return piece or ""


class RemoteEngine:
    """``EngineAPI`` over HTTP; see the module docstring."""

    def __init__(
        self,
        spec: RemoteSpec,
        transport: httpx.BaseTransport | None = None,
        folder_inspector: Callable[[Path], Job[ModelInfo]] | None = None,
    ) -> None:
        self.spec = spec
        self.folder_inspector = folder_inspector  # model folders (the Models window): local
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.client = httpx.Client(
            base_url=spec.base_url, headers=headers, timeout=TIMEOUT, transport=transport
        )
        self.understudy = False  # the server is an Understudy one (set by load)
        self.live = LiveOptions()
        self._stats = StatsBox()
        self._jobs: queue.Queue[tuple[Job[Any], Callable[[], Any]] | None] = queue.Queue()
        self._current: Job[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="remote-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            self._current = item[0]
            run_job(*item)
            self._current = None

    def _submit(self, work: Callable[[], Any], job: Job[Any] | None = None) -> Job[Any]:
        job = job if job is not None else Job()
        self._jobs.put((job, work))
        return job

    def _get(self, path: str) -> Any:
        try:
            response = self.client.get(path)
        except httpx.HTTPError as error:
            raise ModelLoadError(self._unreachable(error)) from error
        if response.status_code >= 400:
            raise ModelLoadError(f"{self.spec.base_url}{path}: {describe_http_error(response)}")
        try:
            return response.json()
        except ValueError as error:
            raise ModelLoadError(
                f"{self.spec.base_url}{path} did not answer JSON: is this an OpenAI-compatible "
                "server?"
            ) from error

    def _unreachable(self, error: httpx.HTTPError) -> str:
        return (
            f"Cannot reach the remote engine at {self.spec.base_url} ({type(error).__name__}: "
            f"{error}). Check the address, and that the server is running."
        )

    # ------------------------------------------------------------ EngineAPI

    def info(self) -> ModelInfo:
        return ModelInfo(
            path=self.spec.base_url,
            name=self.spec.model,
            architecture=REMOTE_ARCHITECTURE,
            model_type="remote",
            num_layers=0,
            moe_layers=0,
            experts_per_layer=0,
            top_k=0,
            bytes_per_expert=0,
            trunk_bytes=0,
            total_expert_bytes=0,
            vocab_size=0,
            max_context=0,
            router_family="remote",
            substitution_supported=self.understudy,
        )

    @staticmethod
    def estimate_now() -> MemoryEstimate:
        return MemoryEstimate("remote", 0, 0, 0, 0, None, None)

    def inspect(self, model_dir: Path) -> Job[ModelInfo]:
        if self.folder_inspector is not None:
            return self.folder_inspector(model_dir)
        return self._submit(self.info)

    def estimate(self, config: LoadConfig) -> Job[MemoryEstimate]:
        return self._submit(self.estimate_now)

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        return self._submit(lambda: self._connect(config, on_event))

    def _connect(self, config: LoadConfig, on_event: EventSink) -> ModelInfo:
        on_event(LoadProgressed(0.1, f"Connecting to {self.spec.base_url}"))
        self._check_model(self._get("/models"))
        self.understudy = self._is_understudy()
        self.live = config.live
        on_event(LoadProgressed(1.0, "Connected"))
        info = self.info()
        on_event(LoadFinished(info, self.estimate_now()))
        return info

    def _check_model(self, listing: Any) -> None:
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise ModelLoadError(
                f"{self.spec.base_url}/models is not an OpenAI model list: is this an "
                "OpenAI-compatible server?"
            )
        names = [str(m.get("id")) for m in data if isinstance(m, dict)]
        if names and self.spec.model not in names:
            raise ModelLoadError(
                f"The server does not serve {self.spec.model!r}; it serves: {', '.join(names)}."
            )

    def _is_understudy(self) -> bool:
        try:
            response = self.client.get("/understudy/stats")
            return response.status_code == 200 and "stats" in response.json()
        except (httpx.HTTPError, ValueError, TypeError):
            return False

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        job = RemoteJob()
        return self._submit(lambda: self._generate(job, request, on_event), job)

    def _generate(
        self, job: RemoteJob, request: GenerateRequest, on_event: EventSink
    ) -> GenerationFinished:
        chat = request.prompt is None
        path = "/chat/completions" if chat else "/completions"
        state = StreamState()
        if job.cancel_requested:
            return self._finished(state, "cancelled", on_event)
        try:
            with self.client.stream("POST", path, json=self.body(request)) as response:
                job.on_cancel = response.close
                if response.status_code >= 400:
                    raise RemoteError(f"The remote engine refused: {describe_http_error(response)}")
                self._read_stream(response, state, chat, on_event, job)
        except httpx.HTTPError as error:
            if not job.cancel_requested:
                raise RemoteError(self._lost(error)) from error
        except RemoteError:
            if not job.cancel_requested:
                raise
        finally:
            job.on_cancel = None
        return self._finished(state, "cancelled" if job.cancel_requested else None, on_event)

    def _lost(self, error: httpx.HTTPError) -> str:
        return f"The connection to {self.spec.base_url} failed: {type(error).__name__}: {error}"

    def _read_stream(
        self,
        response: httpx.Response,
        state: StreamState,
        chat: bool,
        on_event: EventSink,
        job: Job[Any],
    ) -> None:
        for chunk in sse_data(response.iter_lines()):
            piece = delta_text(chunk, chat)
            if piece:
                state.add(piece)
                on_event(TokenReceived(piece, state.pieces - 1))
            choices = chunk.get("choices") or [{}]
            state.finish_reason = choices[0].get("finish_reason") or state.finish_reason
            state.usage = chunk.get("usage") or state.usage
            state.extras = chunk.get("understudy") or state.extras
            if job.cancel_requested:
                return

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        """The OpenAI request body for an engine request."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.spec.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": sampling.top_p,
        }
        if request.prompt is None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.understudy:
            live = request.live or self.live
            body["understudy"] = {"alpha": live.alpha, "policy": live.policy}
        return body

    def _finished(
        self, state: StreamState, forced: str | None, on_event: EventSink
    ) -> GenerationFinished:
        usage = state.usage or {}
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        tokens = completion if isinstance(completion, int) else state.pieces
        elapsed = time.perf_counter() - state.started
        stats = self._stats_from(state, tokens, elapsed)
        self._stats.put(stats)
        reason: Literal["stop", "length", "cancelled"] = "stop"
        if forced == "cancelled":
            reason = "cancelled"
        elif state.finish_reason == "length":
            reason = "length"
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        finished = GenerationFinished(
            state.text,
            tuple(range(tokens)),
            reason,
            stats,
            prompt if isinstance(prompt, int) else 0,
        )
        on_event(finished)
        return finished

    def _stats_from(self, state: StreamState, tokens: int, elapsed: float) -> StatsSnapshot:
        decode = elapsed - state.first_token_s
        speed = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
        stats = StatsSnapshot(tokens_per_second=speed, time_to_first_token_s=state.first_token_s)
        remote = (state.extras or {}).get("stats") if isinstance(state.extras, dict) else None
        if not isinstance(remote, dict):
            return stats
        counters = {
            k: remote[k]
            for k in ("tokens", "hits", "misses", "substitutions", "bytes_moved")
            if isinstance(remote.get(k), int)
        }
        return replace(stats, **counters)

    def set_live_options(self, live: LiveOptions) -> None:
        if live.substitution_on and not self.understudy:
            raise InvalidRequestError(
                "A remote server that is not Understudy does not substitute experts; alpha "
                "stays at 0."
            )
        self.live = live

    def stats(self) -> StatsSnapshot:
        return self._stats.get()

    def reset_stats(self) -> None:
        self._stats.put(StatsSnapshot())

    def render_chat(self, request: GenerateRequest) -> Job[str]:
        def preview() -> str:
            lines = [f"[{m.role}] {m.content}" for m in request.messages]
            note = "(the remote server applies its own chat template to these messages)"
            return "\n".join([note, *lines]) if request.messages else request.prompt or ""

        return self._submit(preview)

    def unload(self) -> Job[None]:
        return self._submit(lambda: None)

    def shutdown(self) -> None:
        """Cancel what runs (closing its stream), finish the queue and close the client."""
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        self._thread.join(5)
        self.client.close()
