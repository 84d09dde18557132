"""The engine thread: load with progress and cancel, streaming, live options, errors, OOM."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from engine.config import CacheConfig, GenerateRequest, LiveOptions, LoadConfig, SamplingConfig
from engine.errors import (
    CancelledError,
    EngineOutOfMemoryError,
    InvalidRequestError,
    ModelLoadError,
    SubstitutionUnsupportedError,
)
from engine.events import (
    EngineFailed,
    GenerationFinished,
    LoadFinished,
    LoadProgressed,
    TokenReceived,
)
from engine.runtime.engine import Engine
from engine.runtime.session import ModelSession
from tests.helpers.stand_in import stand_in

TIMEOUT = 60
GREEDY = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=6)


class Recorder:
    """Collects events (they arrive on the engine thread) and remembers that thread."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.threads: set[int | None] = set()

    def __call__(self, event: object) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def engine():
    engine = Engine()
    yield engine
    engine.shutdown()


def config_for(tiny_checkpoint, **kwargs) -> LoadConfig:
    return LoadConfig(tiny_checkpoint.path, cache=CacheConfig(fraction=0.5), **kwargs)


def test_load_reports_progress_then_finished_on_the_engine_thread(engine, tiny_checkpoint):
    events = Recorder()
    info = engine.load(config_for(tiny_checkpoint), events).result(TIMEOUT)
    assert info.experts_per_layer == 4 and info.moe_layers == 2
    progress = events.of(LoadProgressed)
    assert progress and progress[-1].fraction == 1.0
    assert [p.fraction for p in progress] == sorted(p.fraction for p in progress)
    assert isinstance(events.events[-1], LoadFinished) and events.events[-1].info == info
    assert events.threads == {engine._thread.ident}, "events arrive on the engine thread"


def test_generate_streams_tokens_and_matches_reference(engine, tiny_checkpoint):
    engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
    events = Recorder()
    done = engine.generate(GenerateRequest(prompt="The quick", sampling=GREEDY), events).result(
        TIMEOUT
    )
    assert [t.token_id for t in events.of(TokenReceived)] == list(done.token_ids)
    ids = list(tiny_checkpoint.tokenizer("The quick")["input_ids"])
    with torch.no_grad():
        for step, token in enumerate(done.token_ids):
            logits = tiny_checkpoint.model(
                input_ids=torch.tensor([ids + list(done.token_ids[:step])])
            ).logits
            assert token == int(logits[0, -1].argmax()), f"offloaded greedy token {step} differs"
    stats = engine.stats()
    assert stats.tokens == done.prompt_tokens + len(done.token_ids) - (done.reason == "length")
    assert stats.hits + stats.misses > 0 and stats.tokens_per_second > 0


def test_cancelled_load_leaves_engine_usable(engine, tiny_checkpoint):
    job_box: list = []

    def cancel_on_progress(event: object) -> None:
        if isinstance(event, LoadProgressed):
            job_box[0].cancel()

    job_box.append(engine.load(config_for(tiny_checkpoint), cancel_on_progress))
    with pytest.raises(CancelledError):
        job_box[0].result(TIMEOUT)
    with pytest.raises(InvalidRequestError, match="No model is loaded"):
        engine.generate(GenerateRequest(prompt="hi"), lambda e: None).result(TIMEOUT)
    engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
    done = engine.generate(GenerateRequest(prompt="hi", sampling=GREEDY), lambda e: None).result(
        TIMEOUT
    )
    assert isinstance(done, GenerationFinished)


def test_load_error_is_typed_and_reported_as_event(engine, tmp_path):
    events = Recorder()
    job = engine.load(LoadConfig(tmp_path / "missing"), events)
    with pytest.raises(ModelLoadError):
        job.result(TIMEOUT)
    failed = events.of(EngineFailed)
    assert failed and failed[0].kind in {"ModelLoadError", "UnsupportedModelError"}
    assert engine.thread_alive


def test_out_of_memory_while_generating_says_what_to_change(engine, tiny_checkpoint, monkeypatch):
    engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("engine.runtime.generation.forward", exhausted)
    events = Recorder()
    with pytest.raises(EngineOutOfMemoryError, match="cache budget") as caught:
        engine.generate(GenerateRequest(prompt="hi", sampling=GREEDY), events).result(TIMEOUT)
    assert "context length" in str(caught.value) and "CPU" in str(caught.value)
    assert events.of(EngineFailed)[0].kind == "EngineOutOfMemoryError"
    assert engine.thread_alive
    monkeypatch.undo()
    done = engine.generate(GenerateRequest(prompt="hi", sampling=GREEDY), lambda e: None).result(
        TIMEOUT
    )
    assert done.token_ids, "the model stays loaded and usable after the OOM"


def stand_in_opener(tiny_checkpoint):
    loaded = stand_in(tiny_checkpoint.model, tiny_checkpoint.tokenizer)

    def opener(config, progress, cancelled):
        progress(1.0, "stand-in")
        return ModelSession(loaded, config, None)  # type: ignore[arg-type]

    return opener, loaded


def test_live_options_apply_between_tokens(tiny_checkpoint):
    opener, loaded = stand_in_opener(tiny_checkpoint)
    engine = Engine(open_session=opener)
    try:
        engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
        lfu = LiveOptions(policy="lfu")

        def switch_after_first_token(event: object) -> None:
            if isinstance(event, TokenReceived) and not loaded.offload.live_changes:
                engine.set_live_options(lfu)

        sampling = replace(GREEDY, max_new_tokens=5)
        engine.generate(
            GenerateRequest(prompt="The quick", sampling=sampling), switch_after_first_token
        ).result(TIMEOUT)
        assert loaded.offload.live_changes == [(1, lfu)], "applied before the second forward"
    finally:
        engine.shutdown()


def test_cancel_generation_mid_stream(tiny_checkpoint):
    opener, _loaded = stand_in_opener(tiny_checkpoint)
    engine = Engine(open_session=opener)
    try:
        engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
        job_box: list = []

        def sink(event: object) -> None:
            if isinstance(event, TokenReceived):
                job_box.append(event)
                if len(job_box) == 3:
                    job_box[0].cancel()

        sampling = replace(GREEDY, max_new_tokens=50)
        job_box.append(
            engine.generate(GenerateRequest(prompt="The quick", sampling=sampling), sink)
        )
        done = job_box[0].result(TIMEOUT)
        assert done.reason == "cancelled" and len(done.token_ids) == 2
    finally:
        engine.shutdown()


def test_stats_reset_and_unload(tiny_checkpoint):
    opener, loaded = stand_in_opener(tiny_checkpoint)
    engine = Engine(open_session=opener)
    try:
        engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
        engine.generate(
            GenerateRequest(prompt="The quick", sampling=GREEDY), lambda e: None
        ).result(TIMEOUT)
        assert engine.stats().tokens == sum(loaded.offload.steps) > 0
        engine.reset_stats()
        assert engine.render_chat(GenerateRequest(prompt="x")).result(TIMEOUT) == "x"
        assert engine.stats().tokens == 0 and loaded.offload.steps == []
        engine.unload().result(TIMEOUT)
        assert loaded.offload.closed
        with pytest.raises(InvalidRequestError):
            engine.render_chat(GenerateRequest(prompt="x")).result(TIMEOUT)
    finally:
        engine.shutdown()
    assert not engine.thread_alive, "shutdown ends the thread"


def test_inspect_and_estimate_jobs(engine, tiny_checkpoint):
    info = engine.inspect(tiny_checkpoint.path).result(TIMEOUT)
    estimate = engine.estimate(config_for(tiny_checkpoint, context_length=64)).result(TIMEOUT)
    assert info.top_k == 2 and estimate.kv_cache_bytes == 64 * 64 * 4
    with pytest.raises(ModelLoadError):
        engine.inspect(tiny_checkpoint.path / "nope").result(TIMEOUT)
    assert engine.thread_alive


def test_substitution_refused_at_once_where_unsupported(tiny_checkpoint):
    loaded = stand_in(tiny_checkpoint.model, tiny_checkpoint.tokenizer)
    loaded.info = replace(loaded.info, substitution_supported=False)

    def opener(config, progress, cancelled):
        return ModelSession(loaded, config, None)  # type: ignore[arg-type]

    engine = Engine(open_session=opener)
    try:
        engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
        with pytest.raises(SubstitutionUnsupportedError, match="alpha 0"):
            engine.set_live_options(LiveOptions(policy="smoe", alpha=0.3))
        engine.set_live_options(LiveOptions(policy="smoe", alpha=0.0))
        engine.render_chat(GenerateRequest(prompt="x")).result(TIMEOUT)  # queued after the change
        assert loaded.offload.live == LiveOptions(policy="smoe", alpha=0.0)
    finally:
        engine.shutdown()


def test_live_options_on_the_real_offload_controller(engine, tiny_checkpoint):
    engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
    engine.set_live_options(LiveOptions(policy="lfu"))
    done = engine.generate(
        GenerateRequest(prompt="The quick", sampling=GREEDY), lambda e: None
    ).result(TIMEOUT)
    assert done.token_ids and engine.stats().tokens > 0


def test_a_load_cancelled_while_queued_keeps_the_loaded_model(tiny_checkpoint):
    """The app's Cancel can land before the engine thread starts the load: then nothing is
    unloaded (the model the user has stays usable)."""
    opener, _loaded = stand_in_opener(tiny_checkpoint)
    engine = Engine(open_session=opener)
    try:
        engine.load(config_for(tiny_checkpoint), lambda e: None).result(TIMEOUT)
        gate = threading.Event()
        engine._thread.submit(lambda: gate.wait(TIMEOUT), "holding the thread")
        queued = engine.load(config_for(tiny_checkpoint), lambda e: None)
        queued.cancel()
        gate.set()
        with pytest.raises(CancelledError, match="before it started"):
            queued.result(TIMEOUT)
        done = engine.generate(GenerateRequest(prompt="hi", sampling=GREEDY), lambda e: None)
        assert isinstance(done.result(TIMEOUT), GenerationFinished), "the first model still runs"
    finally:
        engine.shutdown()
