"""Engine perplexity with llama.cpp's activation rounding: where engine and llama.cpp part.

ggml's CPU matrix product of a quantized weight first rounds the activations to the weight
type's dot-product type: blocks of 32 with one fp16 scale (Q8_0; Q8_1 for Q4_1/Q5_1, the same
values) for the legacy types, blocks of 256 with one float scale (Q8_K) for the K-quants,
fp16 or bf16 for F16/BF16 weights; F32 weights see the activations as they are. The engine
multiplies in float with the decoded weights. ``llamacpp_rounding`` makes the engine round the
activations of every matrix product as ggml would for that tensor's block type, so a gap between
the two programs can be split into "the activations' rounding" and "anything else"::

    python -m engine.eval.activation_rounding --text FILE --out OUT.json [--bin DIR]
        [--no-topk-norm] A.gguf B.gguf ...

scores each file in the engine as it is and with the rounding (``llamacpp_compare``'s chunks
and positions), and with ``--bin`` in ``llama-perplexity`` too, in one run. A diagnostic: the
engine never rounds its activations when it serves a model.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as Q
from gguf import get_tensor_name_map
from torch import nn

from engine.eval.llamacpp_compare import (
    arguments,
    engine_perplexity,
    llama_perplexity,
    load_smallest,
    prepared_files,
    write_record,
)
from engine.gguf.reader import GgufModel, open_gguf
from engine.gguf.writer import ARCH_ENUMS
from engine.offload.experts import OffloadedExperts

Rounding = Callable[[torch.Tensor], torch.Tensor]
K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ggml's x86 ``quantize_row_q8_0`` leaves it: per 32 values, q = round(x * 127 /
    amax) (ties to even) times the fp16 scale amax / 127."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)
    scale = (amax / 127.0).half().float()
    return (q * scale).reshape(x.shape).to(x.dtype)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``quantize_row_q8_K`` leaves it: per 256 values, q = min(127, round(x * -127 /
    m)) with m the value of largest magnitude, times the float scale 1 / (-127 / m)."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    at = blocks.abs().argmax(dim=-1, keepdim=True)
    peak = blocks.gather(-1, at)
    safe = torch.where(peak != 0, peak, torch.ones_like(peak))
    iscale = torch.where(peak != 0, -127.0 / safe, torch.zeros_like(peak))
    q = torch.round(blocks * iscale).clamp(max=127)
    scale = torch.where(peak != 0, 1.0 / torch.where(iscale != 0, iscale, 1.0), 0.0)
    return (q * scale).reshape(x.shape).to(x.dtype)


def rounding_for(qtype: int, width: int) -> Rounding | None:
    """How ggml rounds the activations of a product with a ``qtype`` weight of ``width``
    inputs; None where it does not (F32)."""
    if qtype == Q.F32:
        return None
    if qtype == Q.F16:
        return lambda x: x.half().to(x.dtype)
    if qtype == Q.BF16:
        return lambda x: x.bfloat16().to(x.dtype)
    if qtype in K_QUANTS and width % 256 == 0:
        return round_q8_k
    if width % 32 == 0:
        return round_q8_0
    raise ValueError(f"no ggml activation rounding for type {qtype} with {width} inputs")


def _linear_types(model: Any, source: GgufModel) -> Iterator[tuple[nn.Linear, int]]:
    """Each trunk ``nn.Linear`` of ``model`` with its weight's block type in the file."""
    names = get_tensor_name_map(ARCH_ENUMS[source.architecture], model.config.num_hidden_layers)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        gguf_name = names.get_name(name)
        tensor = source.tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None and name == "lm_head":  # tied: llama.cpp reads the embedding
            tensor = source.tensors.get("output.weight") or source.tensors["token_embd.weight"]
        if tensor is None:
            raise ValueError(f"{source.path.name}: no tensor for the layer {name}")
        yield module, tensor.qtype


def _rounded_expert(experts: OffloadedExperts, types: tuple[int, int, int]) -> Any:
    """``OffloadedExperts._expert`` with the gate/up and down inputs rounded for ``types``."""
    gate_up_rounding = rounding_for(types[0], experts.hidden_dim)
    down_rounding = rounding_for(types[2], experts.intermediate_dim)

    def expert(current: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        current = current.to(gate_up.device)
        if gate_up_rounding is not None:
            current = gate_up_rounding(current)
        gate, up = nn.functional.linear(current, gate_up).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        if down_rounding is not None:
            inner = down_rounding(inner)
        return nn.functional.linear(inner, down)

    return expert


@contextmanager
def llamacpp_rounding(loaded: Any, path: Path) -> Iterator[None]:
    """Inside, ``loaded`` (the GGUF file ``path``, eager expert path) rounds every matrix
    product's activations as ggml does for that weight's block type."""
    hooks = []
    source = open_gguf(path)
    for module, qtype in _linear_types(loaded.model, source):
        rounding = rounding_for(qtype, module.in_features)
        if rounding is not None:
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, r=rounding: (r(args[0]), *args[1:])))  # fmt: skip
    patched = []
    for module in loaded.model.modules():
        if isinstance(module, OffloadedExperts):
            if module.path != "eager":
                raise ValueError("the rounding covers the eager expert path only")
            gate, up, down = (source.tensors[f"blk.{module.layer}.ffn_{p}_exps.weight"].qtype
                              for p in ("gate", "up", "down"))  # fmt: skip
            module._expert = _rounded_expert(module, (gate, up, down))  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for experts in patched:
            del experts._expert


def measure(path: Path, text: str, ctx: int) -> dict[str, Any]:
    """The engine's perplexity of ``path`` on ``text`` as it is and with ggml's activation
    rounding."""
    loaded = load_smallest(path)
    ids = loaded.tokenizer(text).input_ids
    try:
        plain = engine_perplexity(loaded, ids, ctx)
        with llamacpp_rounding(loaded, path):
            rounded = engine_perplexity(loaded, ids, ctx)
    finally:
        loaded.offload.close()
    return {"file": path.name, "tokens": len(ids), "engine": plain, "engine_rounded": rounded}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, help="llama.cpp's build/bin: also llama-perplexity")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for path in prepared_files(args):
        row = measure(path, args.text.read_text("utf-8"), args.ctx)
        if args.bin is not None:
            row["llama_cpp"] = llama_perplexity(args.bin, path, args.text, args.ctx)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_record(
        args, rows, f"{platform.machine()} {platform.system()} CPU, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
