"""Hostile model folders: config shapes and absurd sizes are refused before anything is built,
and NaN/Inf weights are named (trunk at load, an expert when it is first used)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.cli import main
from engine.config import CacheConfig, LoadConfig
from engine.errors import ModelLoadError
from engine.runtime import loading
from engine.runtime.loading import inspect_model, load_model
from engine.runtime.validation import NonFiniteWeightError, check_config_sizes
from tests.helpers.moe_families import save_family


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("good") / "qwen2_moe"
    save_family("qwen2_moe", directory)
    return directory


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Callable[[], Path]:
    def make() -> Path:
        target = tmp_path / "model"
        shutil.copytree(good, target)
        return target

    return make


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config), encoding="utf-8")


def _poison(directory: Path, fragment: str) -> str:
    tensors = load_file(directory / "model.safetensors")
    key = next(k for k in sorted(tensors) if fragment in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "42", "null"])
def test_a_config_that_is_not_an_object_is_refused(copy: Callable[[], Path], content: str) -> None:
    directory = copy()
    (directory / "config.json").write_text(content, encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not an object"):
        inspect_model(directory)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_hidden_layers": 10**7}, "num_hidden_layers = 10000000 is out of range"),
        ({"hidden_size": 2**40}, "hidden_size"),
        ({"num_experts": 5000, "num_hidden_layers": 1000}, "expert modules"),
        ({"vocab_size": 4_000_000, "hidden_size": 60_000}, "embedding values"),
        ({"num_experts_per_tok": 99}, "more than the"),
        ({"hidden_size": -4}, "out of range"),
        ({"num_experts": "many"}, "whole number"),
        ({"num_hidden_layers": True}, "whole number"),
        ({"architectures": 7}, "architectures"),
        ({"text_config": [1]}, "text_config"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_built(
    copy: Callable[[], Path], monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], words: str
) -> None:
    directory = copy()
    _edit_config(directory, **changes)

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("transformers was asked to build the absurd model")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", never)
    with pytest.raises(ModelLoadError, match=words):
        inspect_model(directory)


def test_real_sizes_pass() -> None:
    deepseek_v3 = {
        "hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "vocab_size": 129280, "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048, "intermediate_size": 18432, "num_attention_heads": 128,
    }  # fmt: skip
    check_config_sizes(deepseek_v3)
    check_config_sizes({"text_config": {"hidden_size": 5120, "num_local_experts": 16}})


def test_non_finite_trunk_weights_are_named_at_load(copy: Callable[[], Path]) -> None:
    directory = copy()
    key = _poison(directory, "self_attn.q_proj.weight")
    with pytest.raises(NonFiniteWeightError, match=rf"'{key}' \(trunk\) holds 3 NaN or infinite"):
        load_model(LoadConfig(directory, device="cpu"))


def test_a_non_finite_expert_is_named_when_first_used(copy: Callable[[], Path]) -> None:
    directory = copy()
    key = _poison(directory, "layers.1.mlp.experts.2.down_proj")
    loaded = load_model(LoadConfig(directory, device="cpu", cache=CacheConfig(fraction=0.5)))
    try:  # the load itself does not scan every expert
        layer = loaded.offload.store.layers[1]
        loaded.offload.store.row((layer, 0))  # a healthy expert is fine
        with pytest.raises(NonFiniteWeightError, match=rf"'{key}' \(expert\)"):
            loaded.offload.store.row((layer, 2))
    finally:
        loaded.offload.close()


def test_generate_with_a_poisoned_expert_fails_with_its_name_not_garbage(
    copy: Callable[[], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy()
    for expert in range(8):  # every expert of a layer: whatever the router picks
        _poison(directory, f"layers.0.mlp.experts.{expert}.gate_proj")
    argv = ["generate", "--model", str(directory), "--prompt", "hello", "--greedy"]
    code = main([*argv, "--max-new-tokens", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NaN or infinite" in err and "experts." in err and "Traceback" not in err


def test_side_files_far_larger_than_real_ones_are_not_read(
    copy: Callable[[], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.runtime import validation

    directory = copy()
    monkeypatch.setitem(validation.SIDE_FILE_LIMITS, "tokenizer.json", 1000)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json .* it is not read"):
        inspect_model(directory)
    (directory / "config.json").write_bytes(b" " * (validation.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ModelLoadError, match="a model config is a few KB"):
        inspect_model(directory)
