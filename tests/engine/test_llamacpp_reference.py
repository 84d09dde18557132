"""Checked against llama.cpp: the engine's perplexity on a GGUF file equals ``llama-perplexity``'s.

Tiny models of each supported architecture are converted to GGUF (F32, Q8_0, Q4_K_M) by
``engine.gguf.writer`` (DeepSeek-V2 in both of llama.cpp's attention layouts, ``attn_k_b``/
``attn_v_b`` and ``attn_kv_b``, with V2's YaRN rope scaling); llama.cpp tokenizes the text and
scores it in chunks of ``CTX`` tokens (each with a fresh KV cache, counting positions
``CTX/2 .. CTX-2``). The engine scores the same token ids over the same positions, offloaded
at the smallest cache, alpha 0. They must agree within 0.5%. Slow, and skipped unless llama.cpp
was built by ``scripts/build-llamacpp.sh``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.eval.llamacpp_compare import (
    engine_perplexity,
    llama_ids,
    llama_perplexity,
    load_smallest,
)
from engine.gguf.reader import open_gguf
from engine.runtime.loading import inspect_model
from tests.helpers.gguf_models import save_gguf_deepseek2, save_gguf_family
from tests.helpers.llamacpp_build import BIN, CACHE, SOURCE
from tests.helpers.llamacpp_convert import llamacpp_convert
from tests.helpers.tiny_models import SENTENCES

CTX = 64

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BIN / "llama-perplexity").is_file(),
        reason=f"llama.cpp is not built in {CACHE}: run scripts/build-llamacpp.sh (downloads "
        "the llama-cpp-python source from PyPI and builds for ~16 minutes)",
    ),
]


def _save(name: str, root: Path, file_type: str) -> Path:
    if name.startswith("deepseek2"):
        return save_gguf_deepseek2(root, file_type, mla_split=name == "deepseek2", yarn=True)
    return save_gguf_family(name, root, file_type)


@pytest.mark.parametrize("file_type", ["F32", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize(
    "name", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek2", "deepseek2-kv_b"]
)
def test_perplexity_equals_llama_cpp(tmp_path: Path, name: str, file_type: str) -> None:
    model = _save(name, tmp_path, file_type)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 12), encoding="utf-8")
    ids = llama_ids(BIN, model, text)
    loaded = load_smallest(model)
    loaded_ids = loaded.tokenizer(text.read_text(encoding="utf-8")).input_ids
    assert ids == loaded_ids, "llama.cpp and the engine tokenize the text alike"
    ours, theirs = engine_perplexity(loaded, ids, CTX), llama_perplexity(BIN, model, text, CTX)
    print(f"{name} {file_type}: engine {ours:.4f} / llama.cpp {theirs:.4f}")  # pytest -s shows
    assert abs(ours / theirs - 1) < 0.005, f"{name} {file_type}: engine {ours}, llama.cpp {theirs}"


def test_llama_cpps_converter_writes_the_writers_deepseek2_file(tmp_path: Path) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py`` on the same tiny DeepSeek-V2: the same tensors
    (names, shapes, bytes: the k_b transpose included) and the same deepseek2 metadata; the
    engine then loads the converter's file like the writer's."""
    ours = open_gguf(save_gguf_deepseek2(tmp_path, "F32", yarn=True))
    source = tmp_path / "deepseek2-q_lora-yarn-hf"
    theirs = open_gguf(llamacpp_convert(SOURCE, source, tmp_path / "converted.gguf"))
    assert ours.tensors.keys() == theirs.tensors.keys()
    for name, tensor in ours.tensors.items():
        other = theirs.tensors[name]
        assert tensor.shape == other.shape and (tensor.data == other.data).all(), name
    keys = {key for key in theirs.metadata if key.startswith("deepseek2.")}
    assert keys == {key for key in ours.metadata if key.startswith("deepseek2.")}
    for key in keys:
        assert ours.metadata[key] == theirs.metadata[key], key
    assert inspect_model(theirs.path).moe_layers == 2
