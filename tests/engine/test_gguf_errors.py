"""Bad GGUF files get a clear typed error each, fast, and a good file loads afterwards.

Every damaged file is a copy of a good tiny GGUF with bytes changed where the format puts them
(located through ``gguf``'s reader), so each test breaks exactly one thing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from engine.config import LoadConfig
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.runtime.loading import inspect_model, load_model
from tests.helpers.gguf_models import save_gguf_family, save_wide_qwen2_moe


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_family("qwen2_moe", tmp_path_factory.mktemp("good-gguf"), "Q8_0")


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Callable[[], Path]:
    def make() -> Path:
        target = tmp_path / "model.gguf"
        shutil.copyfile(good, target)
        return target

    return make


def _still_works(good: Path) -> None:
    loaded = load_model(LoadConfig(good))
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    loaded.offload.close()


def _position(path: Path, part: np.ndarray) -> int:
    """Byte offset in the file of a part the reader mapped."""
    reader = GGUFReader(path)
    return int(part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0])


def _patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _tensor_field_offset(path: Path, name: str, index: int) -> int:
    reader = GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == name)
    part = tensor.field.parts[index]
    return int(part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0])


def _metadata_offset(path: Path, key: str) -> int:
    reader = GGUFReader(path)
    part = reader.fields[key].parts[-1]
    return int(part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0])


def test_wrong_magic(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    _patch(path, 0, b"GGML")
    with pytest.raises(ModelLoadError, match=r"not a usable GGUF file: it starts with b'GGML'"):
        inspect_model(path)
    _still_works(good)


def test_truncated_file(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(LoadConfig(path))
    _still_works(good)


def test_truncated_inside_the_header(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    with path.open("r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ModelLoadError, match="truncated"):
        inspect_model(path)


def test_tensor_offset_past_the_end(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    offset = _tensor_field_offset(path, "blk.1.ffn_down_exps.weight", -1)  # its data offset
    _patch(path, offset, np.uint64(path.stat().st_size).tobytes())
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(LoadConfig(path))
    _still_works(good)


def test_unknown_quant_type_is_named(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    offset = _tensor_field_offset(path, "blk.0.ffn_up_exps.weight", -2)  # its type
    _patch(path, offset, np.uint32(GGMLQuantizationType.IQ4_NL).tobytes())
    with pytest.raises(ModelLoadError, match="IQ4_NL, which the engine cannot decode"):
        inspect_model(path)
    _patch(path, offset, np.uint32(99).tobytes())
    with pytest.raises(ModelLoadError, match="unknown block type"):
        inspect_model(path)
    _still_works(good)


def test_dense_gguf_is_refused(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "dense.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="dense model"):
        load_model(LoadConfig(path))
    _still_works(good)


def test_unsupported_moe_architecture_is_named(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    offset = _metadata_offset(path, "general.architecture")
    _patch(path, offset, b"olmoeXXX")  # same length as "qwen2moe"
    with pytest.raises(UnsupportedModelError, match="olmoeXXX"):
        inspect_model(path)


def test_split_set_with_a_part_missing(tmp_path: Path) -> None:
    parts = save_wide_qwen2_moe(tmp_path, "Q8_0", split_max_tensors=12)
    parts[1].unlink()
    with pytest.raises(ModelLoadError, match=f"{parts[1].name} is missing"):
        load_model(LoadConfig(parts[0]))
    with pytest.raises(ModelLoadError, match="is missing"):
        inspect_model(tmp_path)  # the folder names the same set


def test_absurd_tensor_count(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    _patch(path, 8, np.uint64(2**40).tobytes())
    with pytest.raises(ModelLoadError, match="header is corrupt"):
        inspect_model(path)
    _still_works(good)


def test_absurd_metadata_size(good: Path, copy: Callable[[], Path]) -> None:
    path = copy()
    _patch(path, _metadata_offset(path, "qwen2moe.expert_count"), np.uint32(2**31).tobytes())
    with pytest.raises(ModelLoadError, match=r"impossible qwen2moe\.expert_count"):
        inspect_model(path)
    _still_works(good)


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        inspect_model(tmp_path / "nothing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        inspect_model(tmp_path / "empty")


def test_folder_with_two_models_asks_for_one(good: Path, tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(good, tmp_path / name)
    with pytest.raises(ModelLoadError, match="several GGUF models"):
        inspect_model(tmp_path)
    assert inspect_model(tmp_path / "a.gguf").moe_layers == 2


def test_inspect_command_names_the_block_types(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    assert main(["inspect", "--model", str(good), "--device", "cpu"]) == 0
    assert "experts kept as Q8_0" in capsys.readouterr().out


def test_old_per_expert_layout_is_named(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "old-mixtral.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_expert_count(2)
    for expert in range(2):
        weights = np.zeros((64, 32), dtype=np.float32)
        writer.add_tensor(f"blk.0.ffn_gate.{expert}.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="before April 2024"):
        inspect_model(path)
    _still_works(good)
