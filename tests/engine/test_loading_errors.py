"""Bad model folders get clear typed errors, and the engine can load a good folder afterwards."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig

from engine.config import CacheConfig, LoadConfig
from engine.errors import (
    CacheBudgetError,
    CancelledError,
    EngineOutOfMemoryError,
    ModelLoadError,
    UnsupportedModelError,
)
from engine.runtime import loading
from engine.runtime.loading import inspect_model, load_model
from tests.helpers.moe_families import save_family


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("good") / "qwen2_moe"
    save_family("qwen2_moe", directory)
    return directory


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Callable[[], Path]:
    made: list[Path] = []

    def make() -> Path:
        target = tmp_path / f"model{len(made)}"
        shutil.copytree(good, target)
        made.append(target)
        return target

    return make


def _still_works(good: Path) -> None:
    loaded = load_model(LoadConfig(good))
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    loaded.offload.close()


def _edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _first_key(tensors: dict[str, torch.Tensor], fragment: str) -> str:
    return next(key for key in sorted(tensors) if fragment in key)


def test_truncated_safetensors(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(LoadConfig(directory))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        inspect_model(directory)
    _still_works(good)


def test_corrupt_safetensors_header(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    file = directory / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_missing_safetensors(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_missing_shard_of_an_index(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"gone\.safetensors is missing"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_pickle_checkpoint_is_refused(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_trunk_tensor_with_wrong_shape(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    _edit_tensors(
        directory, lambda t: t.__setitem__(_first_key(t, "q_proj.weight"), torch.zeros(3, 3))
    )
    with pytest.raises(ModelLoadError, match="wrong shape"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_expert_tensor_with_wrong_shape(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    _edit_tensors(
        directory, lambda t: t.__setitem__(_first_key(t, "experts.1.up"), torch.zeros(3, 3))
    )
    with pytest.raises(ModelLoadError, match=r"shape \[3, 3\], expected \[16, 32\]"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_missing_expert_and_trunk_tensors(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    _edit_tensors(directory, lambda t: t.pop(_first_key(t, "experts.1.up")))
    with pytest.raises(ModelLoadError, match="lacks weights of expert 1 in layer 0"):
        load_model(LoadConfig(directory))
    directory = copy()
    _edit_tensors(directory, lambda t: t.pop(_first_key(t, "q_proj.weight")))
    with pytest.raises(ModelLoadError, match="lacks"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_missing_tokenizer(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    for file in directory.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_missing_and_broken_config(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(LoadConfig(directory))
    (directory / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        inspect_model(directory)
    with pytest.raises(ModelLoadError, match="does not exist"):
        inspect_model(directory / "nowhere")
    _still_works(good)


def test_dense_model_is_unsupported(good: Path, tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match=r"'LlamaForCausalLM'.*no routed experts"):
        load_model(LoadConfig(tmp_path / "llama"))
    _still_works(good)


def test_gpt_oss_layout_is_unsupported(good: Path, tmp_path: Path) -> None:
    config = GptOssConfig(
        vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt_oss")
    with pytest.raises(UnsupportedModelError, match="GptOssForCausalLM") as raised:
        inspect_model(tmp_path / "gpt_oss")
    assert raised.value.architecture == "GptOssForCausalLM"
    _still_works(good)


def test_remote_code_model_is_unsupported(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="my_moe", architectures=["MyMoeForCausalLM"])
    config["auto_map"] = {"AutoConfig": "modeling_my_moe.MyMoeConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_my_moe.py").write_text("raise SystemExit('remote code was run')\n")
    with pytest.raises(UnsupportedModelError, match=r"MyMoeForCausalLM.*custom code"):
        load_model(LoadConfig(directory))
    _still_works(good)


def test_cache_budget_below_one_layer(good: Path) -> None:
    info = inspect_model(good)
    with pytest.raises(CacheBudgetError, match=f"at least {info.top_k}") as raised:
        load_model(LoadConfig(good, cache=CacheConfig(budget_gb=1e-6)))
    assert raised.value.minimum_slots == info.top_k
    assert "GB" in str(raised.value)
    assert raised.value.minimum_bytes > 0
    _still_works(good)


def test_folder_disappears_while_reading_experts(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()

    def progress(fraction: float, message: str) -> None:
        if message.startswith("Reading experts") and directory.exists():
            shutil.rmtree(directory)

    with pytest.raises(ModelLoadError, match="disappeared"):
        load_model(LoadConfig(directory), progress=progress)
    _still_works(good)


def test_folder_disappears_before_the_trunk(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()

    def progress(fraction: float, message: str) -> None:
        if message.startswith("Loading the trunk") and directory.exists():
            shutil.rmtree(directory)

    with pytest.raises(ModelLoadError, match="disappeared"):
        load_model(LoadConfig(directory), progress=progress)
    _still_works(good)


@pytest.mark.parametrize("after_checks", [0, 3, 20])
def test_cancelled_load(good: Path, after_checks: int) -> None:
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > after_checks

    with pytest.raises(CancelledError):
        load_model(LoadConfig(good), cancelled=cancelled)
    assert len(calls) == after_checks + 1  # stops at the first check that says cancel
    _still_works(good)


def test_out_of_memory_is_translated(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loading, "_load_trunk", no_memory)
    with pytest.raises(EngineOutOfMemoryError, match="lower the expert cache budget"):
        load_model(LoadConfig(good))
    monkeypatch.undo()
    _still_works(good)


def test_progress_is_monotonic_and_complete(good: Path) -> None:
    seen: list[float] = []
    load_model(LoadConfig(good), progress=lambda fraction, message: seen.append(fraction))
    assert seen == sorted(seen)
    assert seen[0] == 0.0 and seen[-1] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_a_gpu(good: Path) -> None:
    with pytest.raises(ModelLoadError, match="no usable NVIDIA GPU"):
        load_model(LoadConfig(good, device="cuda"))
    _still_works(good)


def test_host_out_of_memory_is_translated(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ram(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9e12")

    monkeypatch.setattr(loading, "HostExpertStore", no_ram)
    with pytest.raises(EngineOutOfMemoryError, match="Host memory ran out"):
        load_model(LoadConfig(good))
    monkeypatch.undo()
    _still_works(good)


def test_config_with_impossible_values(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    config = json.loads((directory / "config.json").read_text())
    config["num_attention_heads"] = "many"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError):
        inspect_model(directory)
    _still_works(good)


def test_unknown_model_type_is_unsupported(good: Path, copy: Callable[[], Path]) -> None:
    directory = copy()
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="future_moe", architectures=["FutureMoeForCausalLM"])
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"FutureMoeForCausalLM.*'future_moe'"):
        inspect_model(directory)
    _still_works(good)
