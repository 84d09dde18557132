"""Checked against llama.cpp: the engine's perplexity on a GGUF file equals ``llama-perplexity``'s.

Tiny models of each supported architecture are converted to GGUF (F32, Q8_0, Q4_K_M) by
``engine.gguf.writer``; llama.cpp tokenizes the text and scores it in chunks of ``CTX`` tokens
(each with a fresh KV cache, counting positions ``CTX/2 .. CTX-2``). The engine scores the same
token ids over the same positions, offloaded at the smallest cache, alpha 0. They must agree
within 0.5%. Slow, and skipped unless llama.cpp was built by ``scripts/build-llamacpp.sh``.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.gguf_models import save_gguf_family
from tests.helpers.tiny_models import SENTENCES

CTX = 64
CACHE = Path(
    os.environ.get("UNDERSTUDY_LLAMACPP_CACHE", Path.home() / ".cache/understudy/llama.cpp")
)
BIN = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BIN / "llama-perplexity").is_file(),
        reason=f"llama.cpp is not built in {CACHE}: run scripts/build-llamacpp.sh (downloads "
        "the llama-cpp-python source from PyPI and builds for ~16 minutes)",
    ),
]


def _llama(tool: str, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, timeout=600, check=False
    )
    return result.stdout + result.stderr


def _llama_ids(model: Path, text: Path) -> list[int]:
    out = _llama("llama-tokenize", "-m", str(model), "-f", str(text), "--ids", "--log-disable")
    return [int(i) for i in re.findall(r"-?\d+", out.strip().splitlines()[-1])]


def _llama_ppl(model: Path, text: Path) -> float:
    for _attempt in range(3):  # it sometimes loses its last log lines on exit
        # --no-repack: the AMX repacked Q8_0/Q4 path dies with SIGILL on VMs that report AMX
        out = _llama("llama-perplexity", "-m", str(model), "-f", str(text), "-c", str(CTX),
                     "-b", str(CTX), "-t", "1", "--no-repack")  # fmt: skip
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if found:
            return float(found.group(1))
    raise AssertionError(f"llama-perplexity gave no estimate:\n{out[-2000:]}")


def _engine_ppl(model: Path, ids: list[int]) -> float:
    info = inspect_model(model)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    loaded = load_model(LoadConfig(model, dtype="float32", cache=CacheConfig(fraction=fraction)))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // CTX * CTX, CTX):
            chunk = torch.tensor([ids[start : start + CTX]])
            logp = torch.log_softmax(loaded.model(chunk).logits[0].double(), dim=-1)
            for j in range(CTX // 2, CTX - 1):
                total -= logp[j, chunk[0, j + 1]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("file_type", ["F32", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_perplexity_equals_llama_cpp(tmp_path: Path, name: str, file_type: str) -> None:
    model = save_gguf_family(name, tmp_path, file_type)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 12), encoding="utf-8")
    ids = _llama_ids(model, text)
    loaded_ids = load_model(LoadConfig(model)).tokenizer(text.read_text(encoding="utf-8")).input_ids
    assert ids == loaded_ids, "llama.cpp and the engine tokenize the text alike"
    ours, theirs = _engine_ppl(model, ids), _llama_ppl(model, text)
    assert abs(ours / theirs - 1) < 0.005, f"{name} {file_type}: engine {ours}, llama.cpp {theirs}"
