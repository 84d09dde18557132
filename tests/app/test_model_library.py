"""Finding models: the Hugging Face cache layout, the models folder, added folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.model_library import (
    all_models,
    check_model_folder,
    hf_cache_dir,
    human_bytes,
    scan_gguf_files,
    scan_hf_cache,
    scan_lmstudio,
    scan_models_folder,
)


def fake_hf_repo(cache: Path, repo: str, revision: str, size: int, ref: bool = True) -> Path:
    """``models--org--name/{blobs,snapshots/<rev>,refs/main}`` with symlinked files."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    blobs = repo_dir / "blobs"
    snapshot = repo_dir / "snapshots" / revision
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "cfg").write_text('{"architectures": ["Qwen2MoeForCausalLM"]}')
    (blobs / "weights").write_bytes(b"\0" * size)
    os.symlink(blobs / "cfg", snapshot / "config.json")
    os.symlink(blobs / "weights", snapshot / "model.safetensors")
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def test_hf_cache_scan_finds_snapshots_without_copying(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = fake_hf_repo(cache, "Qwen/Qwen1.5-MoE-A2.7B", "abc123", 5000)
    fake_hf_repo(cache, "org/no-ref", "def456", 10, ref=False)
    (cache / "datasets--x--y").mkdir()
    entries = scan_hf_cache(cache)
    assert [e.name for e in entries] == ["Qwen/Qwen1.5-MoE-A2.7B", "org/no-ref"]
    first = entries[0]
    assert first.path == snapshot and first.source == "Hugging Face cache"
    assert first.architecture == "Qwen2MoeForCausalLM"
    assert first.size_bytes > 5000, "sizes follow the symlinks into blobs/"
    assert not any(p.is_file() and not p.is_symlink() for p in snapshot.iterdir()), "not copied"


def test_hf_cache_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", "/x/hub")
    assert hf_cache_dir() == Path("/x/hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", "/y")
    assert hf_cache_dir() == Path("/y/hub")


def test_models_folder_and_added_folders_are_listed_once(user_dirs: Path) -> None:
    models = user_dirs / "data" / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "config.json").write_text('{"model_type": "mixtral"}')
    (models / "not-a-model").mkdir()
    assert [e.name for e in scan_models_folder()] == ["tiny"]
    added = str(models / "tiny")
    entries = all_models((added,), user_dirs / "hf-cache")
    sources = [(e.name, e.source) for e in entries]
    assert sources == [("understudy-mini-moe", "built-in"), ("tiny", "models folder")], (
        "a remembered (loaded) model is listed where it is found, not as added"
    )


def test_adding_a_folder_checks_it_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        check_model_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        check_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_model_folder(tmp_path) == tmp_path


def test_human_bytes() -> None:
    assert [human_bytes(v) for v in (512, 1500, 2.5e9, None)] == [
        "512 B",
        "1.5 KB",
        "2.5 GB",
        "unknown",
    ]


def write_gguf(path: Path, moe: bool = True, file_type: int = 15, arch: str = "qwen3moe") -> Path:
    """A small GGUF with a real header: expert tensors when ``moe`` (header scans need no data)."""
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, arch)
    writer.add_file_type(file_type)
    writer.add_token_list([f"t{i}" for i in range(500)])  # a vocabulary array to skip
    if moe:
        writer.add_expert_count(8)
        writer.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, 4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_are_listed_with_quant_type_and_dense_marked(user_dirs: Path) -> None:
    models = user_dirs / "data" / "models"
    write_gguf(models / "Qwen3-30B-A3B-Q4_K_M.gguf")
    write_gguf(models / "SmolLM2-Q8_0.gguf", moe=False, file_type=7, arch="llama")
    write_gguf(models / "mmproj-model-f16.gguf", moe=False)
    for part in (1, 2):
        write_gguf(models / "big" / f"Mixtral-Q5_K_M-0000{part}-of-00002.gguf", file_type=17)
    entries = {e.name: e for e in scan_models_folder(models)}
    assert set(entries) == {"Qwen3-30B-A3B-Q4_K_M", "SmolLM2-Q8_0", "Mixtral-Q5_K_M (2 parts)"}
    moe = entries["Qwen3-30B-A3B-Q4_K_M"]
    assert (moe.quant, moe.moe, moe.architecture) == ("Q4_K_M", True, "qwen3moe")
    assert moe.size_bytes == (models / "Qwen3-30B-A3B-Q4_K_M.gguf").stat().st_size
    dense = entries["SmolLM2-Q8_0"]
    assert (dense.quant, dense.moe) == ("Q8_0", False), "dense files are marked, not hidden"
    split = entries["Mixtral-Q5_K_M (2 parts)"]
    assert split.path.name == "Mixtral-Q5_K_M-00001-of-00002.gguf", "the set loads from part 1"
    assert split.quant == "Q5_K_M"
    assert split.size_bytes == sum(p.stat().st_size for p in (models / "big").iterdir())


def test_lmstudio_and_hf_cache_gguf_repos_are_found(tmp_path: Path) -> None:
    lmstudio = tmp_path / "lmstudio"
    write_gguf(lmstudio / "Qwen" / "Qwen3-30B-A3B-GGUF" / "Qwen3-30B-A3B-Q6_K.gguf", file_type=18)
    found = scan_lmstudio([lmstudio, tmp_path / "absent"])
    assert [(e.name, e.source, e.quant) for e in found] == [
        ("Qwen3-30B-A3B-Q6_K", "LM Studio", "Q6_K")
    ]
    cache = tmp_path / "hub"
    snapshot = cache / "models--unsloth--Qwen3-30B-A3B-GGUF" / "snapshots" / "abc"
    write_gguf(snapshot / "Qwen3-30B-A3B-Q4_K_M.gguf")
    entries = scan_hf_cache(cache)
    assert [e.name for e in entries] == ["unsloth/Qwen3-30B-A3B-GGUF/Qwen3-30B-A3B-Q4_K_M.gguf"]
    assert entries[0].quant == "Q4_K_M" and entries[0].source == "Hugging Face cache"


def test_damaged_gguf_is_listed_with_the_problem(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "models" / "broken.gguf")
    path.write_bytes(path.read_bytes()[:200])
    (entry,) = scan_gguf_files(tmp_path / "models", "models folder")
    assert entry.moe is None and "header" in entry.problem
    with pytest.raises(ValueError, match="cannot be read as GGUF"):
        check_model_folder(path)


def test_adding_a_gguf_file_checks_it_is_moe(tmp_path: Path) -> None:
    moe = write_gguf(tmp_path / "moe.gguf")
    assert check_model_folder(moe) == moe
    dense = write_gguf(tmp_path / "dense.gguf", moe=False, arch="llama")
    with pytest.raises(ValueError, match="dense model"):
        check_model_folder(dense)


def test_assembled_builtin_is_listed_with_the_small_model_and_unfinished_ones_are_not(
    user_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from engine.paths import ASSEMBLED_STAMP, BUILTIN_MODEL_NAME, fallback_model_dir

    models = user_dirs / "data" / "models"
    assembled = models / BUILTIN_MODEL_NAME
    assembled.mkdir(parents=True)
    (assembled / "config.json").write_text('{"model_type": "qwen2_moe"}')
    (models / f".{BUILTIN_MODEL_NAME}.partial-1").mkdir()
    (models / f".{BUILTIN_MODEL_NAME}.partial-1" / "config.json").write_text("{}")
    assert scan_models_folder() == []  # no stamp yet: half-built, never listed
    stamp = {"files": {"config.json": {"size": (assembled / "config.json").stat().st_size}}}
    (assembled / ASSEMBLED_STAMP).write_text(json.dumps(stamp))
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(assembled))
    if not (fallback_model_dir() / "config.json").is_file():
        pytest.skip("the small model is not in resources/models")
    sources = [(e.name, e.source) for e in all_models((), user_dirs / "hf-cache")]
    assert sources == [
        (BUILTIN_MODEL_NAME, "built-in"),
        ("understudy-mini-moe", "built-in (small)"),
    ]
