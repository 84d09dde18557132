"""Perplexity of GGUF files in the engine and in llama.cpp's ``llama-perplexity``, side by side.

``python -m engine.eval.llamacpp_compare --bin DIR --text FILE --out OUT.json A.gguf B.gguf ...``
runs ``llama-perplexity -c CTX -b CTX -t 1 --no-repack`` on each file and scores the same token
ids (``llama-tokenize``'s, checked against the engine's tokenizer) in the engine over the same
positions: chunks of ``CTX`` tokens, each with a fresh KV cache, counting positions
``CTX/2 .. CTX-2`` (llama-perplexity's rule), experts offloaded at the smallest cache, alpha 0.

``--no-topk-norm`` scores copies of the files whose ``expert_weights_norm`` is switched off:
stock llama.cpp's qwen2moe graph never renormalises the top-k weights, whatever the file says,
while the engine follows the file, so a qwen2moe file with renormalisation on (the built-in
model) is only comparable this way. The copies also get a shared-expert gate of 1e-30 where the
file's is exactly zero (the built-in model's): llama.cpp computes that gate's sigmoid as
``silu(x) / x``, which is 0/0 = NaN at x = 0, while 1e-30 gives sigmoid 0.5 in float32, the
same value the zero gate gives, in both programs. ``--no-repack``: llama.cpp's AMX repacked
path dies with SIGILL on VMs that report AMX. The slow test
``tests/engine/test_llamacpp_reference.py`` uses the same functions on tiny models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

from engine.atomic import write_text_atomic
from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import inspect_model, load_model, minimum_slots


def run_tool(binaries: Path, tool: str, *args: str) -> str:
    """stdout + stderr of one llama.cpp tool. They go to files, not pipes: through pipes its
    last log lines were often lost on this VM, through files not once."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        subprocess.run([str(binaries / tool), *args], stdout=out, stderr=err, timeout=1800,
                       check=False)  # fmt: skip
        out.seek(0)
        err.seek(0)
        return (out.read() + err.read()).decode("utf-8", errors="replace")


def llama_ids(binaries: Path, model: Path, text: Path) -> list[int]:
    out = run_tool(binaries, "llama-tokenize", "-m", str(model), "-f", str(text), "--ids",
                   "--log-disable")  # fmt: skip
    return [int(i) for i in re.findall(r"-?\d+", out.strip().splitlines()[-1])]


def _estimate(out: str) -> float | None:
    """The final perplexity in llama-perplexity's output: its "Final estimate", or else the
    running value printed after the last chunk (the same number; the log line that carries
    the final estimate is sometimes lost on exit)."""
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if found:
        return float(found.group(1))
    chunks = re.search(r"perplexity over (\d+) chunks", out)
    running = re.findall(r"\[(\d+)\]([0-9.]+),", out)
    if chunks and running and int(running[-1][0]) == int(chunks.group(1)):
        return float(running[-1][1])
    return None


def llama_perplexity(binaries: Path, model: Path, text: Path, ctx: int) -> float:
    for _attempt in range(5):  # on this VM it loses the last lines of either stream at times
        out = run_tool(binaries, "llama-perplexity", "-m", str(model), "-f", str(text),
                       "-c", str(ctx), "-b", str(ctx), "-t", "1", "--no-repack")  # fmt: skip
        estimate = _estimate(out)
        if estimate is not None:
            return estimate
    raise RuntimeError(f"llama-perplexity gave no estimate:\n{out[-2000:]}")


def load_smallest(model: Path) -> Any:
    """``model`` loaded in float32 with the smallest expert cache it allows."""
    info = inspect_model(model)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    return load_model(LoadConfig(model, dtype="float32", cache=CacheConfig(fraction=fraction)))


def engine_perplexity(loaded: Any, ids: list[int], ctx: int) -> float:
    """The engine's perplexity over llama-perplexity's chunks and positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            chunk = torch.tensor([ids[start : start + ctx]])
            logp = torch.log_softmax(loaded.model(chunk).logits[0].double(), dim=-1)  # [C, V]
            positions = torch.arange(ctx // 2, ctx - 1)
            total -= logp[positions, chunk[0, positions + 1]].sum().item()
            count += positions.numel()
    return math.exp(total / count)


def without_topk_norm(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose ``<arch>.expert_weights_norm`` is false and whose all-zero
    F32 shared-expert gates are 1e-30 (written in place in the copy)."""
    shutil.copyfile(source, target)
    reader = GGUFReader(target, "r+")
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    field = reader.fields.get(f"{arch}.expert_weights_norm")
    if field is None:
        target.unlink()
        raise ValueError(f"{source.name} has no {arch}.expert_weights_norm to switch off")
    field.parts[field.data[0]][0] = False
    for tensor in reader.tensors:
        zero = tensor.tensor_type.name == "F32" and not tensor.data.any()
        if "ffn_gate_inp_shexp" in tensor.name and zero:
            tensor.data[...] = 1e-30
    reader.data.flush()  # type: ignore[attr-defined]
    return target


def compare(binaries: Path, files: list[Path], text: Path, ctx: int) -> list[dict[str, Any]]:
    rows = []
    for path in files:
        ids = llama_ids(binaries, path, text)
        loaded = load_smallest(path)
        if ids != loaded.tokenizer(text.read_text("utf-8")).input_ids:
            raise RuntimeError(f"{path.name}: llama.cpp and the engine tokenize the text apart")
        ours = engine_perplexity(loaded, ids, ctx)
        loaded.offload.close()
        theirs = llama_perplexity(binaries, path, text, ctx)
        rows.append({"file": path.name, "tokens": len(ids), "engine": ours, "llama_cpp": theirs,
                     "ratio": ours / theirs})  # fmt: skip
        print(f"{path.name}: engine {ours:.4f}, llama.cpp {theirs:.4f}", flush=True)
    return rows


def arguments(description: str) -> argparse.ArgumentParser:
    """The command line shared with ``activation_rounding``: files, text, chunk size, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-topk-norm", action="store_true")
    return parser


def prepared_files(args: argparse.Namespace) -> list[Path]:
    """The files to score: ``args.files``, or their ``--no-topk-norm`` copies beside the output."""
    if not args.no_topk_norm:
        return list(args.files)
    scratch = args.out.parent / "no-topk-norm"
    scratch.mkdir(parents=True, exist_ok=True)
    return [without_topk_norm(path, scratch / path.name) for path in args.files]


def write_record(args: argparse.Namespace, rows: list[dict[str, Any]], machine: str) -> None:
    record = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "machine": machine,
              "load_average": os.getloadavg(), "ctx": args.ctx, "text": str(args.text),
              "no_topk_norm": args.no_topk_norm, "rows": rows}  # fmt: skip
    write_text_atomic(args.out, json.dumps(record, indent=2))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = compare(args.bin, prepared_files(args), args.text, args.ctx)
    write_record(args, rows, f"{platform.machine()} {platform.system()}, CPU, llama.cpp -t 1")
