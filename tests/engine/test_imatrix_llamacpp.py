"""Checked against llama.cpp: the engine's importance matrix equals ``llama-imatrix``'s, and the
writer quantizes with it as ``llama-quantize --imatrix`` does, byte for byte.

Tiny models of each supported architecture are converted to F32 GGUF; ``llama-imatrix`` and
``engine.quant.imatrix`` run over the same token ids in chunks of ``CTX`` (each a fresh cache). Same
tensors, same counts, sums within float rounding (llama.cpp sums float32 products of its own
kernels' activations, here with a float32 KV cache and no flash attention, whose default fp16
rounding moves sums by up to 0.5%; the engine sums in float64): measured within 1e-5 relative. Then
the engine's matrix, written in llama.cpp's format, is given to ``llama-quantize --imatrix`` and to
the writer on a model with 256-wide rows (so K-quants are really used): every tensor's bytes must be
equal. Slow, and skipped unless llama.cpp (with ``llama-imatrix``) was built by
``scripts/build-llamacpp.sh``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from engine.eval.llamacpp_compare import llama_ids, run_tool
from engine.gguf.writer import convert
from engine.quant.imatrix import compute_imatrix, load_reference
from engine.quant.imatrix_file import read_imatrix, write_imatrix
from tests.helpers.gguf_models import save_gguf_family
from tests.helpers.llamacpp_build import BIN, CACHE
from tests.helpers.tiny_models import SENTENCES, save_tiny_checkpoint

CTX = 32

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BIN / "llama-imatrix").is_file(),
        reason=f"llama.cpp's llama-imatrix is not built in {CACHE}: run "
        "scripts/build-llamacpp.sh (downloads the llama-cpp-python source from PyPI)",
    ),
]


def _text(folder: Path) -> Path:
    text = folder / "calibration.txt"
    text.write_text(" ".join(SENTENCES * 12), encoding="utf-8")
    return text


def _llama_imatrix(model: Path, text: Path, out: Path) -> Path:
    log = run_tool(BIN, "llama-imatrix", "-m", str(model), "-f", str(text), "-o", str(out),
                   "-c", str(CTX), "-b", str(CTX), "-t", "1", "--no-repack",
                   "-fa", "off", "--cache-type-k", "f32", "--cache-type-v", "f32")  # fmt: skip
    assert out.is_file(), f"llama-imatrix wrote nothing:\n{log[-2000:]}"
    return out


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_engine_imatrix_equals_llama_imatrix(tmp_path: Path, name: str) -> None:
    model = save_gguf_family(name, tmp_path, "F32")
    text = _text(tmp_path)
    theirs = read_imatrix(_llama_imatrix(model, text, tmp_path / "llama.gguf"))
    reference, _tokenizer = load_reference(model)
    ours = compute_imatrix(reference, llama_ids(BIN, model, text), CTX)
    assert ours.sums.keys() == theirs.sums.keys()
    assert ours.chunk_count == theirs.chunk_count
    for tensor, sums in theirs.sums.items():
        assert ours.counts[tensor].tolist() == theirs.counts[tensor].tolist(), tensor
        assert np.allclose(ours.sums[tensor], sums, rtol=1e-4, atol=1e-7), tensor


def test_writer_with_the_engine_imatrix_equals_llama_quantize(tmp_path: Path) -> None:
    source = tmp_path / "wide-hf"
    save_tiny_checkpoint(source, hidden_size=256, intermediate_size=256,
                         moe_intermediate_size=256, shared_expert_intermediate_size=256,
                         num_attention_heads=4, tie_word_embeddings=False)  # fmt: skip
    f32 = convert(source, tmp_path / "wide-F32.gguf", "F32")[0]
    reference, tokenizer = load_reference(source)
    ids = tokenizer(_text(tmp_path).read_text(encoding="utf-8")).input_ids
    matrix = compute_imatrix(reference, ids, CTX, ("calibration.txt",))
    imatrix = write_imatrix(tmp_path / "engine-imatrix.gguf", matrix)
    for file_type in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"):
        theirs = tmp_path / f"llama-{file_type}.gguf"
        run_tool(BIN, "llama-quantize", "--imatrix", str(imatrix), str(f32), str(theirs),
                 file_type, "1")  # fmt: skip
        ours = convert(source, tmp_path / f"ours-{file_type}.gguf", file_type, imatrix=matrix)[0]
        mine = {t.name: t for t in GGUFReader(ours).tensors}
        for tensor in GGUFReader(theirs).tensors:
            assert mine[tensor.name].tensor_type == tensor.tensor_type, tensor.name
            same = np.array_equal(np.asarray(mine[tensor.name].data), np.asarray(tensor.data))
            assert same, f"{file_type}: {tensor.name} ({tensor.tensor_type.name}) differs"
