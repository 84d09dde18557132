"""The importance matrix of a MoE model over a calibration text, computed as ``llama-imatrix`` does.

For every weight matrix of the transformer blocks (attention, router, shared expert, and each
routed expert separately) it sums the squares of the inputs each input column sees, and counts
the rows: all tokens for a plain matrix, the tokens routed to an expert for that expert's
``ffn_gate``/``ffn_up`` (their input: the normalised hidden state) and ``ffn_down`` (its input:
``act(gate) * up``). The text is cut into chunks of ``ctx`` tokens, each run with a fresh cache,
every position counted, the last partial chunk left out: llama-imatrix's rule. The embedding
and output matrices are left out as llama-imatrix leaves them by default.

The model is the plain transformers model with eager experts (a safetensors folder, or a GGUF
file decoded up front by ``engine.runtime.gguf_loading.load_gguf_reference``), observed with
forward pre-hooks; names are llama.cpp's (gguf's HF -> GGUF tensor map). The result is an
``engine.quant.imatrix_file.ImportanceMatrix`` that ``llama-quantize --imatrix`` and
``engine.gguf.writer.convert(imatrix=...)`` read alike.

``python -m engine.quant.imatrix --model M --text FILE --out imatrix.gguf [--ctx 512]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import get_tensor_name_map
from torch import nn

from engine.gguf.writer import ARCH_ENUMS, ARCHITECTURES
from engine.offload.experts import is_experts_class
from engine.quant.imatrix_file import ImportanceMatrix, write_imatrix

PARTS = ("gate", "up", "down")


class Collector:
    """Running sums (float64) and counts per GGUF tensor name."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, squares: torch.Tensor, counts: torch.Tensor) -> None:
        """Add summed squares [n_mat, cols] and row counts [n_mat] to ``name``'s."""
        if name not in self.sums:
            self.sums[name] = torch.zeros_like(squares, dtype=torch.float64)
            self.counts[name] = torch.zeros_like(counts, dtype=torch.int64)
        self.sums[name] += squares.double()
        self.counts[name] += counts

    def matrix(self, chunks: int, ctx: int, datasets: tuple[str, ...]) -> ImportanceMatrix:
        return ImportanceMatrix(
            {n: s.float().numpy() for n, s in self.sums.items()},
            {n: c.numpy().astype(np.int64) for n, c in self.counts.items()},
            chunks, ctx, datasets,
        )  # fmt: skip


def _dense_hook(collector: Collector, name: str) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T, cols]
        collector.add(name, (rows * rows).sum(0, keepdim=True), torch.tensor([rows.shape[0]]))

    return hook


def expert_squares(
    module: Any, hidden: torch.Tensor, top_k_index: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(part, summed squares [E, cols], counts [E]) of one experts call: ``gate``/``up`` see the
    routed tokens' hidden states, ``down`` sees ``act(gate) * up`` of each routed expert."""
    experts = int(module.num_experts)
    hidden = hidden.detach().double()  # [T, H]
    flat = top_k_index.reshape(-1)  # [T * k]: expert of each (token, slot)
    token = torch.arange(hidden.shape[0]).repeat_interleave(top_k_index.shape[1])
    counts = torch.bincount(flat, minlength=experts)
    squares = torch.zeros(experts, hidden.shape[1], dtype=torch.float64)
    squares.index_add_(0, flat, hidden[token] ** 2)
    yield "gate", squares, counts
    yield "up", squares, counts
    down = torch.zeros(experts, int(module.down_proj.shape[-1]), dtype=torch.float64)
    for expert in torch.unique(flat).tolist():
        rows = hidden[token[flat == expert]].to(module.gate_up_proj.dtype)
        gate, up = nn.functional.linear(rows, module.gate_up_proj[expert]).chunk(2, dim=-1)
        down[expert] = ((module.act_fn(gate) * up).double() ** 2).sum(0)
    yield "down", down, counts


def _experts_hook(collector: Collector, layer: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        hidden, top_k_index = args[0], args[1]
        with torch.no_grad():
            for part, squares, counts in expert_squares(module, hidden, top_k_index):
                collector.add(f"blk.{layer}.ffn_{part}_exps.weight", squares, counts)

    return hook


def _layer_of(module_name: str) -> int:
    return int(module_name.split(".layers.")[1].split(".")[0])


def attach(model: Any, collector: Collector) -> list[Any]:
    """Forward pre-hooks on every block matrix of ``model``; the handles (to remove)."""
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"no llama.cpp tensor names for a {config.model_type} model")
    names = get_tensor_name_map(ARCH_ENUMS[arch], config.num_hidden_layers)
    handles = []
    for module_name, module in model.named_modules():
        if is_experts_class(type(module)) or hasattr(module, "gate_up_proj"):
            handles.append(module.register_forward_pre_hook(
                _experts_hook(collector, _layer_of(module_name))))  # fmt: skip
            continue
        weight = getattr(module, "weight", None)
        gguf_name = names.get_name(module_name)
        if weight is None or weight.ndim != 2 or not (gguf_name or "").startswith("blk."):
            continue
        handles.append(
            module.register_forward_pre_hook(_dense_hook(collector, f"{gguf_name}.weight"))
        )
    return handles


def compute_imatrix(
    model: Any, ids: list[int], ctx: int = 512, datasets: tuple[str, ...] = ()
) -> ImportanceMatrix:
    """The importance matrix of ``model`` over the token ids ``ids`` in chunks of ``ctx``."""
    chunks = len(ids) // ctx
    if chunks < 1:
        raise ValueError(f"{len(ids)} tokens do not fill one chunk of {ctx}")
    collector = Collector()
    handles = attach(model, collector)
    try:
        with torch.no_grad():
            for chunk in range(chunks):
                model(torch.tensor([ids[chunk * ctx : (chunk + 1) * ctx]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return collector.matrix(chunks, ctx, datasets)


def load_reference(path: Path) -> tuple[Any, Any]:
    """(model with eager experts in float32 on the CPU, tokenizer) for a folder or GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.gguf.reader import gguf_files_in, is_gguf, open_gguf
    from engine.runtime.gguf_loading import load_gguf_reference, load_gguf_tokenizer

    if is_gguf(path):
        first = gguf_files_in(path)[0] if path.is_dir() else path
        return load_gguf_reference(first), load_gguf_tokenizer(open_gguf(first))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_experts_implementation("eager")
    return model, AutoTokenizer.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder or .gguf file")
    parser.add_argument("--text", type=Path, required=True, help="calibration text")
    parser.add_argument("--out", type=Path, required=True, help="imatrix file to write (.gguf)")
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_reference(args.model)
    ids = tokenizer(args.text.read_text(encoding="utf-8")).input_ids
    matrix = compute_imatrix(model, ids, args.ctx, (str(args.text),))
    write_imatrix(args.out, matrix)
    print(f"wrote {args.out}: {len(matrix.sums)} tensors over {matrix.chunk_count} chunks")


if __name__ == "__main__":
    main()
