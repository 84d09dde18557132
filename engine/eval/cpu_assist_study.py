"""CPU assist from quantized experts, measured per expert call: decode-once vs kernels.

``python -m engine.eval.cpu_assist_study --out DIR --threads 1`` times one expert computation
(``down(act(gate(x)) * up(x))``, the CPU-assisted expert) for one token and a few, on the
built-in model's expert geometry (hidden 576, expert width 32) and a Qwen3-30B-A3B-like one
(2048 x 768), random weights, every way the engine could compute it from quantized blocks,
interleaved round by round in one process (medians of the rounds):

- ``lru hit``: the fp32 weights decoded once and kept (``HostExpertStore.host_weights``'s LRU,
  today's path): a float matmul;
- ``decode+mm Q8_0`` / ``Q4_1``: the expert decoded from its blocks at every call, then the same;
- ``int4pack Q4_0`` / ``Q4_1`` / ``Q4_K``: torch's ``_weight_int4pack_mm_for_cpu`` on the blocks
  repacked once (``engine.quant.int4pack``; Q4_K only where rows are whole 256-weight blocks);
- ``... bf16``: the same in bfloat16 (the compute dtype of a bf16 model; CPU assist on a CUDA
  machine computes in it): activations cast to bf16, the result back to fp32 for the error;
- ``int8pack/group Q8_0``: ``_weight_int8pack_mm`` (one scale per output channel) once per group
  of 32 inputs, summed: GGML's per-block scales applied group by group;
- ``int8 bmm Q8_0``: the int8 quants cast to fp32 per call and multiplied block-wise in one
  ``bmm`` (``[G, T, 32] x [G, 32, N]``), the scales applied to the partial sums.

For each: microseconds per call, the bytes it keeps in RAM per expert beyond nothing (the GGML
blocks themselves are the host store's and counted once, as ``blocks``), and the largest
absolute and relative error against the same blocks decoded and multiplied in fp64. Writes
``cpu_assist_study_<capability>.json`` (torch's CPU kernel set: ``ATEN_CPU_CAPABILITY=avx2``
runs the AVX2 kernels a desktop without AVX-512 gets) and prints a Markdown table.
``--quick``: tiny sizes and one round (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.atomic import write_text_atomic
from engine.quant.ggml_blocks import Q, dequantize, type_name
from engine.quant.ggml_encode import encode
from engine.quant.int4pack import can_pack, pack

GEOMETRIES = {"builtin (576 x 32)": (576, 32), "qwen3-30b-a3b (2048 x 768)": (2048, 768)}
TOKENS = (1, 4)
Call = Callable[[torch.Tensor], torch.Tensor]


def _expert(gate: Call, up: Call, down: Call) -> Call:
    return lambda x: down(F.silu(gate(x)) * up(x))


def _linear(weight: torch.Tensor) -> Call:
    return lambda x: F.linear(x, weight)


def _blocks(weights: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(encode(weights, qtype)).reshape(-1))


class Expert:
    """One random expert's three weights, as fp32 and as blocks of each type asked for."""

    def __init__(self, hidden: int, width: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
        self.floats = {
            p: (rng.standard_normal(s) * 0.02).astype(np.float32) for p, s in self.shapes.items()
        }
        self._blocks: dict[int, dict[str, torch.Tensor]] = {}

    def blocks(self, qtype: int) -> dict[str, torch.Tensor]:
        if qtype not in self._blocks:
            self._blocks[qtype] = {p: _blocks(w, qtype) for p, w in self.floats.items()}
        return self._blocks[qtype]

    def decoded(self, qtype: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        blocks = self.blocks(qtype)
        return {p: dequantize(blocks[p], qtype, self.shapes[p], dtype) for p in self.shapes}

    def block_bytes(self, qtype: int) -> int:
        return sum(b.numel() for b in self.blocks(qtype).values())


def lru_hit(expert: Expert, qtype: int, dtype: torch.dtype = torch.float32) -> tuple[Call, int]:
    w = expert.decoded(qtype, dtype)
    call = _expert(_linear(w["gate"]), _linear(w["up"]), _linear(w["down"]))
    return _in(call, dtype), _nbytes(w.values())


def _in(call: Call, dtype: torch.dtype) -> Call:
    """``call`` on activations cast to ``dtype`` (bf16 compute), the result back in fp32."""
    if dtype == torch.float32:
        return call
    return lambda x: call(x.to(dtype)).float()


def lru_hit_bf16(expert: Expert, qtype: int) -> tuple[Call, int]:
    return lru_hit(expert, qtype, torch.bfloat16)


def decode_each(expert: Expert, qtype: int) -> tuple[Call, int]:
    blocks, shapes = expert.blocks(qtype), expert.shapes

    def call(x: torch.Tensor) -> torch.Tensor:
        w = {p: dequantize(blocks[p], qtype, shapes[p], torch.float32) for p in shapes}
        return _expert(_linear(w["gate"]), _linear(w["up"]), _linear(w["down"]))(x)

    return call, 0


def int4pack(expert: Expert, qtype: int, dtype: torch.dtype = torch.float32) -> tuple[Call, int]:
    blocks, shapes = expert.blocks(qtype), expert.shapes
    packed = {p: pack(blocks[p], qtype, shapes[p], dtype) for p in shapes}
    call = _expert(packed["gate"].matmul, packed["up"].matmul, packed["down"].matmul)
    return _in(call, dtype), sum(p.nbytes for p in packed.values())


def int4pack_bf16(expert: Expert, qtype: int) -> tuple[Call, int]:
    return int4pack(expert, qtype, torch.bfloat16)


def _q8_0_planes(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes -> int8 quants ``[N, G, 32]`` and fp32 scales ``[N, G]``."""
    n, k = shape
    blocks = raw.reshape(-1, 34)
    scales = blocks[:, :2].contiguous().view(torch.float16).float().reshape(n, k // 32)
    return blocks[:, 2:].contiguous().view(torch.int8).reshape(n, k // 32, 32), scales


def int8pack_grouped(expert: Expert, qtype: int) -> tuple[Call, int]:
    """``_weight_int8pack_mm`` per group of 32 inputs (its scale is per output channel)."""
    kept = 0
    calls: dict[str, Call] = {}
    for part, shape in expert.shapes.items():
        quants, scales = _q8_0_planes(expert.blocks(qtype)[part], shape)
        groups = [
            (quants[:, g].contiguous(), scales[:, g].contiguous()) for g in range(shape[1] // 32)
        ]
        kept += _nbytes(t for pair in groups for t in pair)
        calls[part] = _int8_groups(groups)
    return _expert(calls["gate"], calls["up"], calls["down"]), kept


def _int8_groups(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> Call:
    def call(x: torch.Tensor) -> torch.Tensor:
        out = None
        for g, (quants, scales) in enumerate(groups):
            y = torch._weight_int8pack_mm(x[:, g * 32 : (g + 1) * 32].contiguous(), quants, scales)
            out = y if out is None else out.add_(y)
        assert out is not None, "a row has at least one group"
        return out

    return call


def int8_bmm(expert: Expert, qtype: int) -> tuple[Call, int]:
    """int8 quants cast per call, one ``bmm`` over the groups, scales on the partial sums."""
    kept = 0
    calls: dict[str, Call] = {}
    for part, shape in expert.shapes.items():
        quants, scales = _q8_0_planes(expert.blocks(qtype)[part], shape)
        quants_t = quants.permute(1, 2, 0).contiguous()  # [G, 32, N]
        scales_t = scales.t().contiguous().unsqueeze(1)  # [G, 1, N]
        kept += _nbytes((quants_t, scales_t))
        calls[part] = _int8_bmm_call(quants_t, scales_t)
    return _expert(calls["gate"], calls["up"], calls["down"]), kept


def _int8_bmm_call(quants_t: torch.Tensor, scales_t: torch.Tensor) -> Call:
    groups = quants_t.shape[0]

    def call(x: torch.Tensor) -> torch.Tensor:
        xg = x.reshape(x.shape[0], groups, 32).transpose(0, 1)  # [G, T, 32]
        partial = torch.bmm(xg, quants_t.float())  # [G, T, N]
        return (partial * scales_t).sum(dim=0)  # [T, N]

    return call


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


METHODS: list[tuple[str, Callable[[Expert, int], tuple[Call, int]], int]] = [
    ("lru hit (fp32 decoded once)", lru_hit, Q.Q8_0),
    ("lru hit bf16 (decoded once)", lru_hit_bf16, Q.Q4_1),
    ("int4pack bf16 Q4_1", int4pack_bf16, Q.Q4_1),
    ("int4pack bf16 Q4_K", int4pack_bf16, Q.Q4_K),
    ("decode+mm Q8_0", decode_each, Q.Q8_0),
    ("decode+mm Q4_1", decode_each, Q.Q4_1),
    ("int4pack Q4_0", int4pack, Q.Q4_0),
    ("int4pack Q4_1", int4pack, Q.Q4_1),
    ("int4pack Q4_K", int4pack, Q.Q4_K),
    ("int8pack/group Q8_0", int8pack_grouped, Q.Q8_0),
    ("int8 bmm Q8_0", int8_bmm, Q.Q8_0),
]


def _applicable(qtype: int, hidden: int, width: int) -> bool:
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
        fits = can_pack(qtype, (width, hidden)) and can_pack(qtype, (hidden, width))
        return fits and _fits(qtype, hidden, width)
    return _fits(qtype, hidden, width)


def _fits(qtype: int, hidden: int, width: int) -> bool:
    block = 256 if qtype in (Q.Q4_K,) else 32
    return hidden % block == 0 and width % block == 0


def reference(expert: Expert, qtype: int, x: torch.Tensor) -> torch.Tensor:
    w = expert.decoded(qtype, torch.float64)
    return _expert(_linear(w["gate"]), _linear(w["up"]), _linear(w["down"]))(x.double())


def _time(call: Call, x: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        call(x)
    return (time.perf_counter() - start) / reps * 1e6


def measure_geometry(
    name: str, hidden: int, width: int, rounds: int, quick: bool = False
) -> list[dict[str, Any]]:
    expert = Expert(hidden, width, seed=0)
    cases = []
    for label, build, qtype in METHODS:
        if not _applicable(qtype, hidden, width):
            continue
        start = time.perf_counter()
        call, kept = build(expert, qtype)
        setup_us = (time.perf_counter() - start) * 1e6
        cases.append((label, qtype, call, kept, setup_us))
    inputs = {t: torch.randn(t, hidden, generator=torch.Generator().manual_seed(t)) for t in TOKENS}
    times: dict[tuple[str, int], list[float]] = {(c[0], t): [] for c in cases for t in TOKENS}
    reps = {t: 1 if quick else max(3, int(2e4 // (hidden * width * 3 / 1e4 + 1))) for t in TOKENS}
    for _ in range(rounds):  # interleaved: every case once per round
        for label, _q, call, _k, _s in cases:
            for t in TOKENS:
                call(inputs[t])  # warm
                times[(label, t)].append(_time(call, inputs[t], reps[t]))
    rows = []
    for label, qtype, call, kept, setup_us in cases:
        for t in TOKENS:
            ref = reference(expert, qtype, inputs[t])
            err = (call(inputs[t]).double() - ref).abs().max().item()
            samples = times[(label, t)]
            rows.append({
                "geometry": name, "method": label, "blocks": type_name(qtype), "tokens": t,
                "us_per_call": statistics.median(samples), "us_range": [min(samples), max(samples)],
                "kept_bytes": kept, "block_bytes": expert.block_bytes(qtype),
                "fp32_bytes": 3 * hidden * width * 4, "setup_us": setup_us,
                "max_abs_err": err, "max_rel_err": err / max(ref.abs().max().item(), 1e-30),
            })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| geometry | method | T | us/call | vs lru fp32 | vs lru bf16 | kept B/expert "
        "(fp32 = 1.0) | max abs err | max rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp32, bf16 = (_base(rows, label) for label in ("lru hit (fp32", "lru hit bf16"))
    for r in rows:
        key = (r["geometry"], r["tokens"])
        us = r["us_per_call"]
        kept = f"{r['kept_bytes']:,} ({r['kept_bytes'] / r['fp32_bytes']:.3f})"
        lines.append(
            f"| {r['geometry']} | {r['method']} | {r['tokens']} | {us:.1f} | "
            f"{us / fp32[key]:.2f}x | {us / bf16[key]:.2f}x | {kept} | "
            f"{r['max_abs_err']:.1e} | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def _base(rows: list[dict[str, Any]], label: str) -> dict[tuple[str, int], float]:
    return {
        (r["geometry"], r["tokens"]): r["us_per_call"]
        for r in rows
        if r["method"].startswith(label)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.eval.cpu_assist_study")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    geometries = {"quick (256 x 64)": (256, 64)} if args.quick else GEOMETRIES
    rounds = 1 if args.quick else args.rounds
    rows = [
        r
        for name, (h, w) in geometries.items()
        for r in measure_geometry(name, h, w, rounds, args.quick)
    ]
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "threads": args.threads,
        "rounds": rounds, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows,
    }  # fmt: skip
    name = f"cpu_assist_study_{torch.backends.cpu.get_cpu_capability().lower()}.json"
    write_text_atomic(args.out / name, json.dumps(record, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
