"""Settings files: per-model persistence, corrupt files, full disk, engine config mapping."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from app.crash_guard import CrashGuard
from app.settings import (
    AppPrefs,
    ModelSettings,
    SettingsSaveError,
    SettingsStore,
    to_load_config,
    to_sampling,
)


def test_settings_are_saved_per_model_and_survive_a_new_store(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path)
    store.save_model(tmp_path / "model-a", ModelSettings(alpha=0.3, context_length=4096))
    store.save_model(tmp_path / "model-b", ModelSettings(temperature=0.1))
    again = SettingsStore(tmp_path)
    assert again.load_model(tmp_path / "model-a") == ModelSettings(alpha=0.3, context_length=4096)
    assert again.load_model(tmp_path / "model-b").temperature == 0.1
    assert again.load_model(tmp_path / "model-c") == ModelSettings()
    assert again.warnings == []


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"alpha": 0.9}',
        '{"context_length": "long"}',
        "[1, 2]",
        '{"prefetch": 1}',
        '{"temperature": NaN}',  # non-finite numbers pass every < check unless refused
        '{"cache_budget_gb": Infinity}',
        '{"repetition_penalty": Infinity}',
        '{"alpha": NaN}',
    ],
)
def test_corrupt_settings_give_defaults_a_message_and_keep_the_file(
    tmp_path: Path, content: str
) -> None:
    store = SettingsStore(tmp_path)
    store.save_model(tmp_path / "m", ModelSettings(alpha=0.2))
    (path,) = (tmp_path / "models").glob("*.json")
    path.write_text(content)
    assert store.load_model(tmp_path / "m") == ModelSettings()
    assert len(store.warnings) == 1 and "defaults are used" in store.warnings[0]
    (kept,) = (tmp_path / "models").glob("*.corrupt-*")
    assert kept.read_text() == content, "the bad file is kept aside, not deleted"


def test_full_disk_keeps_the_old_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cfg"
    store = SettingsStore(folder)
    store.save_prefs(AppPrefs(theme="dark"))
    before = (folder / "prefs.json").read_text()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        SettingsSaveError, match=r"the disk is full.*previous settings are unchanged"
    ):
        store.save_prefs(AppPrefs(theme="light"))
    assert (folder / "prefs.json").read_text() == before
    assert [p.name for p in folder.iterdir()] == ["prefs.json"], "no temp file left behind"


def test_reload_fields_are_told_apart_from_live_and_sampling_ones() -> None:
    base = ModelSettings()
    assert replace(base, context_length=4096).needs_reload(base)
    assert replace(base, cache_budget_gb=2.0).needs_reload(base)
    assert not replace(base, alpha=0.4, policy="lru").needs_reload(base)
    assert not replace(base, temperature=0.2).needs_reload(base)


def test_preferences_map_to_engine_config_in_one_place(tmp_path: Path) -> None:
    settings = ModelSettings(device="cpu", cache_budget_gb=1.5, alpha=0.25, prefetch=False, top_k=7)
    config = to_load_config(tmp_path, settings, force=True)
    assert (config.device, config.cache.budget_gb, config.force) == ("cpu", 1.5, True)
    assert (config.live.alpha, config.live.policy, config.live.prefetch) == (0.25, "smoe", False)
    assert to_sampling(settings).top_k == 7


def test_invalid_settings_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="Alpha must be in"):
        ModelSettings(alpha=0.7)
    with pytest.raises(ValueError, match="Policy must be one of"):
        ModelSettings(policy="random")
    with pytest.raises(ValueError, match="theme must be one of"):
        AppPrefs(theme="purple")


def test_last_working_settings_round_trip(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path)
    assert store.load_last_working() is None
    store.save_last_working(tmp_path / "m", ModelSettings(context_length=1024))
    last = store.load_last_working()
    assert last is not None and last.settings.context_length == 1024
    assert last.model_dir == str(tmp_path / "m")


def test_crash_guard_reports_a_run_that_did_not_stop(tmp_path: Path) -> None:
    assert CrashGuard(tmp_path).start() is False
    assert CrashGuard(tmp_path).start() is True, "the first run never called stop()"
    guard = CrashGuard(tmp_path)
    guard.stop()
    assert guard.start() is False


def test_prefs_file_is_json_a_person_can_read(tmp_path: Path) -> None:
    SettingsStore(tmp_path).save_prefs(AppPrefs(font_size=14))
    data = json.loads((tmp_path / "prefs.json").read_text())
    assert data["font_size"] == 14 and data["theme"] == "system"


def _model_with_curve(folder: Path, curve: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "understudy_curve.json").write_text(json.dumps(curve), encoding="utf-8")
    return folder


def test_a_new_model_starts_at_the_alpha_its_benchmark_curve_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    measured = _model_with_curve(
        tmp_path / "measured",
        {"model": "measured", "default_alpha": 0.3, "points": [{"alpha": 0.0}, {"alpha": 0.3}]},
    )
    store = SettingsStore(tmp_path / "config")
    assert store.load_model(measured).alpha == 0.3
    assert store.load_model(tmp_path / "unmeasured").alpha == 0.0, "no curve: start exact"
    store.save_model(measured, ModelSettings(alpha=0.1))
    assert store.load_model(measured).alpha == 0.1, "the user's own choice wins over the curve"


def test_an_unusable_curve_leaves_the_model_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    broken = _model_with_curve(tmp_path / "broken", {"default_alpha": "high", "points": []})
    assert SettingsStore(tmp_path / "config").load_model(broken).alpha == 0.0


def test_expert_quantization_is_a_per_model_reload_setting(tmp_path: Path) -> None:
    base = ModelSettings()
    assert replace(base, expert_quant="int4").needs_reload(base)
    assert to_load_config(tmp_path, replace(base, expert_quant="int8")).expert_quant == "int8"
    with pytest.raises(ValueError, match="Expert quantization must be one of"):
        ModelSettings(expert_quant="int3")


def test_mapped_experts_combine_with_quantized_ones_per_model(tmp_path: Path) -> None:
    base = ModelSettings()
    both = replace(base, expert_quant="int4", mmap_experts=True)
    assert both.needs_reload(base) and replace(both, mmap_experts=False).needs_reload(both)
    config = to_load_config(tmp_path, both)
    assert (config.expert_quant, config.mmap_experts) == ("int4", True)
    store = SettingsStore(tmp_path / "config")
    model = tmp_path / "model"
    model.mkdir()
    store.save_model(model, both)
    again = SettingsStore(tmp_path / "config").load_model(model)
    assert (again.expert_quant, again.mmap_experts) == ("int4", True)
