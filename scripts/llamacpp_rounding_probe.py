"""Why the engine and llama.cpp differ on quantized DeepSeek-V2 files: llama.cpp's roundings.

``PYTHONPATH=. python scripts/llamacpp_rounding_probe.py --bin LLAMA_CPP/build/bin --out DIR``
writes the tests' tiny DeepSeek-V2 (``tests/helpers/gguf_models.py``, YaRN on) as Q8_0 in both
attention layouts and scores the tests' text (chunks of 64, llama-perplexity's positions) four
ways: llama-perplexity; the engine's model (every expert decoded, no offloading, which equals
the offloaded engine at alpha 0); the same with the roundings llama.cpp's CPU kernels make
emulated: the input of every matmul with a quantized weight rounded to Q8_0 blocks (the
``vec_dot_q8_0_q8_0`` path quantizes activations), and for the ``attn_k_b``/``attn_v_b`` file
attention computed in llama.cpp's absorbed order (``q_nope`` times ``k_b``, the latent
attention output times ``v_b``, each input Q8_0-rounded) with the f16 KV cache and f16 attention
operands (``engine.eval.activation_rounding`` does the per-type rounding for any GGUF file;
this probe adds the absorbed attention order). A diagnostic, not a test: it monkeypatches
``torch.nn.functional.linear`` and ``DeepseekV2Attention.forward`` in this process only.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds

from engine.atomic import write_text_atomic
from engine.eval.activation_rounding import round_q8_0 as q8
from engine.eval.llamacpp_compare import engine_perplexity, llama_ids, llama_perplexity
from engine.runtime.gguf_loading import load_gguf_reference
from tests.helpers.gguf_models import save_gguf_deepseek2
from tests.helpers.tiny_models import SENTENCES

CTX = 64
LINEAR = F.linear
ATTENTION = ds.DeepseekV2Attention.forward


def rounded_linear(experts: int) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
        quantized = weight.dim() == 2 and weight.shape[0] != experts and weight.shape[1] % 32 == 0
        return LINEAR(q8(x) if quantized else x, weight, bias)  # routers stay F32 in the file

    return linear


def absorbed(self: Any, hidden_states: torch.Tensor, attention_mask: Any = None,
             past_key_values: Any = None, position_embeddings: Any = None,
             **_: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """DeepseekV2 attention in llama.cpp's absorbed-MLA order and roundings (prefill only)."""
    hidden = hidden_states
    b, s = hidden.shape[:-1]
    q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
    q = q.view(b, s, -1, self.qk_head_dim).transpose(1, 2)
    q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    latent, k_pe = torch.split(
        self.kv_a_proj_with_mqa(hidden), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
    )
    latent = self.kv_a_layernorm(latent).view(b, 1, s, self.kv_lora_rank)
    q_pe, k_pe = ds.apply_rotary_emb(q_pe, k_pe.view(b, 1, s, -1), position_embeddings)
    heads = q.shape[1]
    kv_b = self.kv_b_proj.weight.view(heads, -1, self.kv_lora_rank)
    k_b, v_b = kv_b[:, : self.qk_nope_head_dim], kv_b[:, self.qk_nope_head_dim :]

    def f16(t: torch.Tensor) -> torch.Tensor:
        return t.half().float()

    q_abs = f16(torch.einsum("bhsn,hnr->bhsr", q8(q_nope), k_b))
    latent, k_pe, q_pe = f16(latent), f16(k_pe), f16(q_pe)
    scores = (q_abs @ latent.transpose(2, 3) + q_pe @ k_pe.transpose(2, 3)) * self.scaling
    weights = torch.softmax(scores + torch.full((s, s), -math.inf).triu(1), dim=-1)
    out = torch.einsum("bhsr,hvr->bhsv", q8(f16(weights) @ latent), v_b)
    return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


def probe(binaries: Path, path: Path, text: Path, mla_split: bool) -> dict[str, Any]:
    ids = llama_ids(binaries, path, text)
    model = load_gguf_reference(path)
    scored = types.SimpleNamespace(model=model)
    row = {"file": path.name, "engine": engine_perplexity(scored, ids, CTX)}
    F.linear = rounded_linear(model.config.n_routed_experts)
    if mla_split:
        ds.DeepseekV2Attention.forward = absorbed  # type: ignore[method-assign,assignment]
    try:
        row["engine_llamacpp_roundings"] = engine_perplexity(scored, ids, CTX)
    finally:
        F.linear = LINEAR
        ds.DeepseekV2Attention.forward = ATTENTION  # type: ignore[method-assign]
    row["llama_cpp"] = llama_perplexity(binaries, path, text, CTX)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        text = root / "text.txt"
        text.write_text(" ".join(SENTENCES * 12), encoding="utf-8")
        rows = [
            probe(args.bin, save_gguf_deepseek2(root, "Q8_0", split, yarn=True), text, split)
            for split in (True, False)
        ]
    if args.out:
        write_text_atomic(args.out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
