"""ggml's activation rounding, emulated for the engine-vs-llama.cpp diagnostic
(``engine.eval.activation_rounding``): the roundings against gguf's reference quantizer, and the
context manager on a tiny model converted in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from engine.eval.activation_rounding import llamacpp_rounding, round_q8_0, round_q8_k, rounding_for
from engine.eval.llamacpp_compare import load_smallest
from engine.gguf.writer import convert
from tests.helpers.gguf_models import WIDE
from tests.helpers.tiny_models import save_tiny_checkpoint


def _activations(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 3


def test_q8_0_rounding_equals_ggufs_round_trip() -> None:
    x = _activations(64, 256)
    reference = dequantize(quantize(x.numpy(), Q.Q8_0), Q.Q8_0).reshape(x.shape)
    ours = round_q8_0(x).numpy()
    step = np.abs(x.numpy()).reshape(64, 8, 32).max(axis=-1).repeat(32, axis=-1) / 127
    assert np.mean(ours == reference) > 0.999, "the same rounding, up to a rare tie"
    assert np.all(np.abs(ours - reference) <= step.reshape(x.shape) * 1.01)
    assert not torch.equal(round_q8_0(x), x), "it rounds"


def test_q8_k_rounding_keeps_the_peak_and_255_levels() -> None:
    x = _activations(4, 512, seed=1)
    rounded = round_q8_k(x)
    for block, original in zip(rounded.reshape(-1, 256), x.reshape(-1, 256), strict=True):
        peak = original.abs().max()
        assert len(torch.unique(block)) <= 255
        assert (block - original).abs().max() <= peak / 127 / 2 * 1.001
        assert torch.isclose(block.abs().max(), peak, rtol=1e-6)
    zeros = torch.zeros(2, 256)
    assert torch.equal(round_q8_k(zeros), zeros), "an all-zero block stays zero, no NaN"


def test_rounding_follows_the_weight_type() -> None:
    assert rounding_for(Q.F32, 576) is None
    assert rounding_for(Q.Q5_0, 576) is round_q8_0
    assert rounding_for(Q.Q8_0, 32) is round_q8_0
    assert rounding_for(Q.Q6_K, 512) is round_q8_k
    half = rounding_for(Q.F16, 64)
    third = torch.tensor([1 / 3])
    assert half is not None and torch.equal(half(third), third.half().float())
    with pytest.raises(ValueError, match="no ggml activation rounding"):
        rounding_for(Q.Q5_0, 48)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rounding")
    save_tiny_checkpoint(root / "hf", **WIDE)
    return {kind: convert(root / "hf", root / f"{kind}.gguf", kind)[0] for kind in ("F32", "Q8_0")}


def _before_inside_after(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of ``path`` (smallest cache) before, inside and after ``llamacpp_rounding``."""
    loaded = load_smallest(path)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        before = loaded.model(ids).logits
        with llamacpp_rounding(loaded, path):
            inside = loaded.model(ids).logits
        after = loaded.model(ids).logits
    loaded.offload.close()
    return before, inside, after


def test_rounding_changes_a_quantized_model_only_inside(files: dict[str, Path]) -> None:
    before, rounded, after = _before_inside_after(files["Q8_0"])
    assert not torch.equal(before, rounded), "Q8_0 weights: the activations are rounded"
    assert torch.allclose(before, rounded, atol=0.1), "by a rounding, not a different model"
    assert torch.equal(before, after), "leaving the context restores the engine"


def test_an_f32_file_is_not_rounded(files: dict[str, Path]) -> None:
    before, rounded, _ = _before_inside_after(files["F32"])
    assert torch.equal(before, rounded), "F32 weights see the activations as they are"
