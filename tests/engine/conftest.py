"""Fixtures for engine tests: a tiny Qwen2-MoE checkpoint on disk and a loaded stand-in.

``tiny_checkpoint`` is built once per session (read-only: copy it before damaging it);
``tiny_loaded`` wraps the same model in a ``LoadedModel``-shaped stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.stand_in import StandInLoaded, stand_in
from tests.helpers.tiny_models import save_tiny_checkpoint

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the OpenMP
# workers spin against other processes: one thread is ~40x faster for these tests.
torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyCheckpoint:
    path: Path
    model: Any  # the transformers model saved there (fp32, eager experts)
    tokenizer: Any


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    model, tokenizer = save_tiny_checkpoint(path)
    return TinyCheckpoint(path, model, tokenizer)


@pytest.fixture
def tiny_loaded(tiny_checkpoint: TinyCheckpoint) -> StandInLoaded:
    return stand_in(tiny_checkpoint.model, tiny_checkpoint.tokenizer)


QUANTIZABLE = {
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}


@pytest.fixture(scope="session")
def quant_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-MoE whose expert rows are multiples of 32 (``--expert-quant`` groups);
    read-only, shared by the expert-quant tests."""
    path = tmp_path_factory.mktemp("quantizable") / "tiny"
    save_tiny_checkpoint(path, **QUANTIZABLE)
    return path


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user data folder (``UNDERSTUDY_DATA_DIR``) of one test: its quantized-experts cache."""
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"
