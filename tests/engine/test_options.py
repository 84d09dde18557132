"""User choices -> engine config: the one mapping the CLI and the app share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.config import CacheConfig, LiveOptions
from engine.errors import InvalidRequestError, ModelLoadError
from engine.options import (
    EngineOptions,
    build_live_options,
    build_load_config,
    build_request,
    build_sampling,
    unused_options,
)


def test_load_config_carries_every_choice(tmp_path):
    options = EngineOptions(
        model_dir=tmp_path, device="cpu", dtype="bfloat16", cache_gb=1.5, context_length=512,
        force=True, policy="smoe", alpha=0.3, eviction="lru", substitution=False, prefetch=False,
    )  # fmt: skip
    config = build_load_config(options)
    assert config.model_dir == tmp_path and config.device == "cpu" and config.dtype == "bfloat16"
    assert (
        config.cache == CacheConfig(budget_gb=1.5) and config.context_length == 512 and config.force
    )
    assert config.live == LiveOptions(
        policy="smoe",
        alpha=0.3,
        eviction="lru",
        substitution=False,
        prefetch=False,
        cpu_assist=True,
    )


def test_live_options_flags_switch_method_parts():
    live = build_live_options(EngineOptions(policy="smoe", alpha=0.2, cpu_assist=False))
    assert live.substitution_on and live.prefetch_on and not live.cpu_assist_on
    assert live.effective_eviction == "score"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(cache_gb=1.0, cache_fraction=0.5), "either"),
        (EngineOptions(cache_fraction=1.5), "fraction"),
        (EngineOptions(device="tpu"), "device"),
        (EngineOptions(policy="fifo"), "policy"),
        (EngineOptions(context_length=4), "context length"),
    ],
)
def test_bad_choices_become_invalid_request(tmp_path, options, message):
    with pytest.raises(InvalidRequestError, match=f"(?i){message}"):
        build_load_config(replace(options, model_dir=tmp_path))


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_load_config(EngineOptions(model_dir=tmp_path / "gone"))


def test_greedy_means_pure_argmax_unless_penalty_given():
    assert build_sampling(greedy=True).repetition_penalty == 1.0
    assert build_sampling(greedy=True, repetition_penalty=1.3).repetition_penalty == 1.3
    assert build_sampling().repetition_penalty == 1.1, "sampling keeps the config default"


def test_requests_raw_and_chat():
    sampling = build_sampling(max_new_tokens=3)
    raw = build_request("hi", sampling)
    assert raw.prompt == "hi" and raw.sampling.max_new_tokens == 3
    chat = build_request("hi", sampling, chat=True, system="Be kind.")
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be kind."), ("user", "hi")]
    with pytest.raises(InvalidRequestError, match="empty"):
        build_request("  ", sampling)
    with pytest.raises(InvalidRequestError, match="no user message"):
        build_request(" ", sampling, chat=True)


def test_smoe_without_alpha_runs_at_the_curve_alpha_like_the_app(tmp_path, monkeypatch):
    from app.settings import default_model_settings

    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    model = tmp_path / "m"
    model.mkdir()
    assert build_live_options(EngineOptions(model_dir=model)).alpha == 0.0  # no curve: exact
    (model / "understudy_curve.json").write_text('{"default_alpha": 0.3}', encoding="utf-8")
    live = build_live_options(EngineOptions(model_dir=model))
    assert live.policy == "smoe" and live.alpha == 0.3
    assert default_model_settings(model).alpha == live.alpha  # one default everywhere
    assert build_live_options(EngineOptions(model_dir=model, policy="lru")).alpha == 0.0
    assert build_live_options(EngineOptions(model_dir=model, alpha=0.1)).alpha == 0.1
    mine = tmp_path / "data" / "curves" / "m.json"
    mine.parent.mkdir(parents=True)
    for text in ('{"default_alpha": NaN}', '{"default_alpha": 5}', "[1]", "not json"):
        mine.write_text(text, encoding="utf-8")  # the user's own curve decides, unusable: 0
        assert build_live_options(EngineOptions(model_dir=model)).alpha == 0.0, text
    mine.write_text('{"default_alpha": 0.2}', encoding="utf-8")
    assert build_live_options(EngineOptions(model_dir=model)).alpha == 0.2


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (EngineOptions(policy="lru", alpha=0.5), "--alpha 0.5 does nothing with --policy lru"),
        (EngineOptions(policy="lfu", cpu_assist=False), "--no-cpu-assist does nothing"),
        (EngineOptions(substitution=False, alpha=0.2), "with --no-substitution"),
    ],
)
def test_choices_that_do_nothing_are_named(options, words):
    assert any(words in problem for problem in unused_options(options))
    assert unused_options(EngineOptions(alpha=0.2)) == []
    assert unused_options(EngineOptions(policy="lru")) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(alpha=float("nan")), "Alpha must be a finite number"),
        (EngineOptions(cache_gb=float("inf")), "finite"),
    ],
)
def test_non_finite_choices_are_invalid(tmp_path, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        build_load_config(replace(options, model_dir=tmp_path))
    with pytest.raises(InvalidRequestError, match="finite"):
        build_sampling(temperature=float("nan"))
