"""Quantized experts measured side by side: fidelity, bytes moved, CPU decode speed.

``python -m engine.eval.quant_study --out DIR`` converts the built-in model (or ``--model``) to
GGUF F32, Q8_0 and Q4_K_M in ``DIR``, then on one machine, in one run:

1. **Scheme choice for --expert-quant**: every expert quantized and decoded up front with
   round-to-nearest int8 (symmetric) and int4 (asymmetric) at group sizes 32, 64 and 128, and
   the GGML formats the engine stores (Q8_0, Q5_0, Q4_1, Q4_0); perplexity on the held-out
   sample and agreement with the unquantized model (mean KL, top-1) - the cost of the
   quantization itself, with no offloading or substitution involved.
2. **GGUF files through the engine** at the same cache fraction (policy lru, alpha 0), with
   quantized slots (the CUDA layout): perplexity, bytes moved per token, misses per token;
   and Q4_K_M with the cache budget in GB that the F32 model gets (more slots, same bytes).
3. **CPU decode tok/s** of the fp32 safetensors model vs the F32, Q8_0 and Q4_K_M files and
   the safetensors model with ``--expert-quant int8`` (CPU default: experts decoded once, into
   the slot, as the cache takes them), interleaved rounds, one thread, cache fraction 0.5.
4. **The whole method's alpha curve on the Q4_K_M file** (policy smoe: substitution, prefetch,
   CPU assist) at the bench's alphas, cache 0.5, quantized slots: perplexity and its change
   against fp32, top-1 agreement with the same file at alpha 0 (the cost of substitution) and
   with fp32, bytes moved per token and their ratio to fp32's (lru).

``--engine-only`` runs part 2 alone (``quant_engine.json``), ``--alpha-only`` part 4 with its F32
reference (``quant_alpha.json``), ``--speed-only CACHE`` part 3 (``quant_speed.json``); each
JSON is rewritten after every run, so a stopped run keeps what it measured. ``--expert-types
Q4_0,Q4_1`` adds Q4_K_M files whose routed experts are forced to those types. ``--imatrix FILE``
(an importance matrix: ``python -m engine.quant.imatrix`` or llama.cpp's ``llama-imatrix``) adds
the same files quantized with it (rows ``Q4_K_M, imatrix`` and ``Q4_K_M, experts Q4_1,
imatrix``); ``--only NAMES`` measures just those rows, in that order.

Writes ``quant_study.json`` and prints a Markdown summary. Slow-ish: about a minute per
configuration of the built-in model on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.atomic import write_text_atomic
from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.eval.bench import ALPHAS
from engine.gguf.writer import EXPERT_TYPES, convert
from engine.paths import builtin_model_dir
from engine.quant.ggml_encode import encode
from engine.quant.imatrix_file import read_imatrix
from engine.runtime.loading import load_model

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "heldout_sample.txt"
BASE_TYPES = ("F32", "Q8_0", "Q4_K_M")
WINDOW = 256


def _rtn(weights: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Round-to-nearest group-wise quantize-dequantize along the last axis (fp16 scales)."""
    rows = weights.reshape(-1, group)
    if symmetric:
        levels = 2 ** (bits - 1) - 1
        scale = (np.abs(rows).max(axis=1, keepdims=True) / levels).astype(np.float16)
        scale = scale.astype(np.float32)
        q = np.clip(np.rint(rows / np.where(scale == 0, 1, scale)), -levels, levels)
        return (q * scale).reshape(weights.shape)
    levels = 2**bits - 1
    low = rows.min(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    scale = ((rows.max(axis=1, keepdims=True) - low) / levels).astype(np.float16)
    scale = scale.astype(np.float32)
    q = np.clip(np.rint((rows - low) / np.where(scale == 0, 1, scale)), 0, levels)
    return (q * scale + low).reshape(weights.shape)


def _ggml(weights: np.ndarray, qtype: int) -> np.ndarray:
    rows = weights.reshape(-1, weights.shape[-1])
    return gguf_dequantize(encode(rows, qtype), Q(qtype)).reshape(weights.shape)


SCHEMES: dict[str, tuple[float, Any]] = {  # name -> (bits per weight, quantize-dequantize)
    "int8 g32 sym (= Q8_0)": (8.5, lambda w: _ggml(w, Q.Q8_0)),
    "int8 g128 sym": (8.125, lambda w: _rtn(w, 8, 128, True)),
    "Q5_0 (5-bit g32 sym)": (5.5, lambda w: _ggml(w, Q.Q5_0)),
    "int4 g32 asym (= Q4_1)": (5.0, lambda w: _ggml(w, Q.Q4_1)),
    "int4 g64 asym": (4.5, lambda w: _rtn(w, 4, 64, False)),
    "int4 g128 asym": (4.25, lambda w: _rtn(w, 4, 128, False)),
    "Q4_0 (int4 g32 sym)": (4.5, lambda w: _ggml(w, Q.Q4_0)),
}


def _windows(ids: torch.Tensor) -> list[torch.Tensor]:
    return [ids[:, i : i + WINDOW] for i in range(0, ids.shape[1] - 1, WINDOW)]


def _score(model: Any, ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Perplexity over non-overlapping windows, and the log-probabilities of each window."""
    total, count, logprobs = 0.0, 0, []
    with torch.no_grad():
        for window in _windows(ids):
            logits = model(window).logits.float()  # [1, W, V]
            logp = torch.log_softmax(logits, dim=-1)
            logprobs.append(logp)
            target = window[:, 1:]
            total -= logp[:, :-1].gather(-1, target[..., None]).sum().item()
            count += target.numel()
    return math.exp(total / count), logprobs


def _agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    kl, top1, n = 0.0, 0, 0
    for ref, got in zip(reference, other, strict=True):
        kl += torch.sum(ref.exp() * (ref - got), dim=-1).sum().item()
        top1 += int((ref.argmax(-1) == got.argmax(-1)).sum().item())
        n += ref.shape[1]
    return {"mean_kl": kl / n, "top1_agreement": top1 / n}


def scheme_study(model_dir: Path, ids: torch.Tensor) -> list[dict[str, Any]]:
    """The cost of each quantization scheme alone: experts decoded up front, no offload."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base.set_experts_implementation("eager")
    ppl, reference = _score(base, ids)
    rows = [{"scheme": "fp32 (none)", "bits": 32.0, "perplexity": ppl}]
    originals = {n: p.detach().clone() for n, p in base.named_parameters() if ".experts." in n}
    for name, (bits, roundtrip) in SCHEMES.items():
        with torch.no_grad():
            for param_name, value in originals.items():
                decoded = roundtrip(value.numpy())
                base.get_parameter(param_name).copy_(torch.from_numpy(np.asarray(decoded)))
        ppl, logprobs = _score(base, ids)
        rows.append({"scheme": name, "bits": bits, "perplexity": ppl,
                     **_agreement(reference, logprobs)})  # fmt: skip
        print(f"  {name}: ppl {ppl:.3f}", flush=True)
    return rows


def _engine_run(
    path: Path, ids: torch.Tensor, cache: CacheConfig, live: LiveOptions | None = None
) -> dict[str, Any]:
    """Teacher-forced decode through the engine with quantized slots (the layout on CUDA, so
    the bytes moved are what would cross PCIe); ``predictions`` holds each step's argmax."""
    config = LoadConfig(
        path, device="cpu", dtype="float32", cache=cache, quantized_slots=True,
        live=live or LiveOptions(),
    )  # fmt: skip
    loaded = load_model(config)
    loaded.offload.reset_stats()
    tokens = 0
    total, count, predictions = 0.0, 0, []
    with torch.no_grad():
        for window in _windows(ids):  # token by token: the decode access pattern
            past = None
            for i in range(window.shape[1] - 1):
                out = loaded.model(window[:, i : i + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                total -= logp[window[0, i + 1]].item()
                predictions.append(int(logp.argmax()))
                count += 1
                loaded.offload.end_step(1)
                tokens += 1
    stats = loaded.offload.stats()
    store = loaded.offload.store
    layers = {str(layer): _layer_row(store.layer_shape(layer)) for layer in store.layers}
    loaded.offload.close()
    return {
        "perplexity": math.exp(total / count),
        "bytes_per_token": stats.bytes_moved / tokens,
        "misses_per_token": stats.misses / tokens,
        "cache_slots": stats.cache_slots,
        "cache_bytes": stats.cache_bytes,
        "expert_bytes_by_layer": layers,
        "predictions": predictions,
    }


def _layer_row(shape: Any) -> str:
    """``Q4_K/Q4_K/Q5_0 29696 B``: a layer's block types (gate/up/down) and expert bytes."""
    types = getattr(shape, "type_names", str(shape.dtype).removeprefix("torch."))
    return f"{types} {shape.nbytes} B"


def _top1(reference: list[int], other: list[int]) -> float:
    return sum(a == b for a, b in zip(reference, other, strict=True)) / len(reference)


def alpha_curve(
    path: Path,
    ids: torch.Tensor,
    fp32: dict[str, Any],
    alphas: tuple[float, ...] = ALPHAS,
    saved: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """The whole method (policy smoe) on ``path`` at cache 0.5, alpha by alpha, against fp32's
    lru run (``fp32``) and the same file at alpha 0; ``saved`` gets the rows after each alpha."""
    runs: dict[float, dict[str, Any]] = {}
    rows = []
    for alpha in dict.fromkeys((0.0, *alphas)):
        run = runs[alpha] = _engine_run(path, ids, CacheConfig(fraction=0.5),
                                        LiveOptions("smoe", alpha))  # fmt: skip
        rows.append({
            "alpha": alpha, "perplexity": run["perplexity"],
            "perplexity_change_vs_fp32": run["perplexity"] / fp32["perplexity"] - 1,
            "top1_vs_alpha0": _top1(runs[0.0]["predictions"], run["predictions"]),
            "top1_vs_fp32": _top1(fp32["predictions"], run["predictions"]),
            "bytes_per_token": run["bytes_per_token"],
            "bytes_vs_fp32": run["bytes_per_token"] / fp32["bytes_per_token"],
            "misses_per_token": run["misses_per_token"],
        })  # fmt: skip
        print(f"  alpha {alpha}: {rows[-1]}", flush=True)
        saved(rows)
    return rows


def _engine_runs(
    files: dict[str, Path], ids: torch.Tensor, saved: Callable[[dict[str, Any]], None]
) -> dict[str, dict[str, Any]]:
    """Each file at cache 0.5 (lru, alpha 0), and Q4_K_M with the cache in GB the F32 file gets;
    ``saved`` gets the runs so far after each one (a long run keeps what it measured)."""
    half = CacheConfig(fraction=0.5)
    engine: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        engine[name] = _engine_run(path, ids, half)
        saved(engine)
        if name == "Q4_K_M" and "F32" in engine:
            same_gb = CacheConfig(budget_gb=engine["F32"]["cache_bytes"] / 1e9)
            engine["Q4_K_M, F32's cache GB"] = _engine_run(path, ids, same_gb)
            saved(engine)
    return engine


def _decode_speed(
    configs: dict[str, LoadConfig], prompt: torch.Tensor, steps: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Median tok/s per model over interleaved rounds: by the wall clock, and by this process's
    CPU time (one thread: the time other programs on a shared machine take is left out)."""
    models = {name: load_model(config) for name, config in configs.items()}
    wall: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for _round in range(rounds):
        for name, loaded in models.items():  # interleaved: each round runs every model once
            with torch.no_grad():
                out = loaded.model(prompt, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    out = loaded.model(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {
        "wall": {name: steps / float(np.median(times)) for name, times in wall.items()},
        "cpu_time": {name: steps / float(np.median(times)) for name, times in cpu.items()},
        "cpu_time_range": {name: [steps / max(t), steps / min(t)] for name, t in cpu.items()},
        "wall_range": {name: [steps / max(t), steps / min(t)] for name, t in wall.items()},
    }


def _speed(
    model_dir: Path, files: dict[str, Path], prompt: torch.Tensor, rounds: int, cache: float
) -> dict[str, dict[str, Any]]:
    """CPU decode tok/s of fp32, the GGUF files and ``--expert-quant int8``, interleaved."""
    cache_config = CacheConfig(fraction=cache)
    contenders = {
        name: LoadConfig(path, device="cpu", dtype="float32", cache=cache_config)
        for name, path in {"fp32 safetensors": model_dir, **files}.items()
    }
    fp32 = contenders["fp32 safetensors"]
    contenders["int8 (--expert-quant)"] = replace(fp32, expert_quant="int8")
    return _decode_speed(contenders, prompt, steps=64, rounds=rounds)


def _machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or platform.system()}, CPU, torch "
        f"{torch.__version__}, 1 thread"
    )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--speed-only", type=float, default=None, metavar="CACHE",
        help="only the decode speed, at this cache fraction (writes quant_speed.json)",
    )  # fmt: skip
    parser.add_argument(
        "--engine-only", action="store_true",
        help="only the GGUF files through the engine: bytes, misses, perplexity",
    )  # fmt: skip
    parser.add_argument(
        "--alpha-only", action="store_true",
        help="only F32 (lru) and the alpha curve on Q4_K_M (writes quant_alpha.json)",
    )  # fmt: skip
    parser.add_argument(
        "--imatrix", type=Path, default=None, metavar="FILE",
        help="also the Q4_K_M (and --expert-types) files quantized with this importance matrix",
    )  # fmt: skip
    parser.add_argument(
        "--only", default="", metavar="NAMES",
        help="only these rows, in this order (names split on ';', e.g. 'Q4_K_M, imatrix;F32')",
    )  # fmt: skip
    parser.add_argument(
        "--expert-types", default="", metavar="TYPES",
        help=f"also Q4_K_M files with the routed experts forced to these types (comma-separated; "
        f"{', '.join(EXPERT_TYPES)}), through the engine like the others",
    )  # fmt: skip
    args = parser.parse_args()
    for name in filter(None, args.expert_types.split(",")):
        if name not in EXPERT_TYPES:
            parser.error(f"--expert-types: {name!r} is not one of {', '.join(EXPERT_TYPES)}")
    return args


def _variants(expert_types: str, imatrix: bool) -> dict[str, tuple[str, str | None, bool]]:
    """Row name -> (file type, forced expert type, with the importance matrix)."""
    rows: dict[str, tuple[str, str | None, bool]] = {t: (t, None, False) for t in BASE_TYPES}
    for name in filter(None, expert_types.split(",")):
        rows[f"Q4_K_M, experts {name}"] = ("Q4_K_M", name, False)
    for name, (file_type, expert, _plain) in list(rows.items()):
        if imatrix and file_type == "Q4_K_M":
            rows[f"{name}, imatrix"] = (file_type, expert, True)
    return rows


def _files(
    model_dir: Path, out: Path, expert_types: str, imatrix: Path | None = None, only: str = ""
) -> dict[str, Path]:
    """The GGUF files to measure, converted into ``out``: F32, Q8_0, Q4_K_M, the overrides, and
    the Q4_K_M ones again with ``imatrix``; ``only`` (names split on ``;``) picks and orders."""
    matrix = read_imatrix(imatrix) if imatrix is not None else None
    rows = _variants(expert_types, matrix is not None)
    wanted = [name for name in only.split(";") if name] or list(rows)
    unknown = [name for name in wanted if name not in rows]
    if unknown:
        raise SystemExit(f"--only: no rows named {unknown}; rows: {list(rows)}")
    files = {}
    for name in wanted:
        file_type, expert, weighted = rows[name]
        stem = name.replace(", ", "-").replace(" ", "-")
        files[name] = convert(model_dir, out / f"model-{stem}.gguf", file_type, expert_type=expert,
                              imatrix=matrix if weighted else None)[0]  # fmt: skip
    return files


def _writer(out: Path, header: dict[str, Any]) -> Callable[[str, Any], None]:
    """A function that writes ``header`` plus one result under ``key`` (atomically)."""

    def save(key: str, value: Any) -> None:
        record = {**header, "date": datetime.now(UTC).isoformat(timespec="minutes"),
                  "load_average": os.getloadavg(), key: value}  # fmt: skip
        write_text_atomic(out, json.dumps(record, indent=2))

    return save


def _public(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v for k, v in run.items() if k != "predictions"} for name, run in runs.items()
    }


def main() -> None:
    args = _arguments()
    torch.set_num_threads(1)
    model_dir = args.model or builtin_model_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(SAMPLE.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    ids = ids[:, : args.tokens]
    files = _files(model_dir, args.out, args.expert_types, args.imatrix, args.only)
    header = {"machine": _machine(), "model": str(model_dir), "tokens": int(ids.shape[1])}
    if args.speed_only is not None:
        speed = _speed(model_dir, files, ids[:, :32], args.rounds, args.speed_only)
        record = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "machine": _machine(),
                  "load_average": os.getloadavg(),
                  "model": str(model_dir), "cache_fraction": args.speed_only,
                  "rounds": args.rounds, "decode_tokens_per_second": speed}  # fmt: skip
        write_text_atomic(args.out / "quant_speed.json", json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
        return
    if args.engine_only:
        save = _writer(args.out / "quant_engine.json", header)
        engine = _engine_runs(files, ids, lambda runs: save("engine", _public(runs)))
        print(json.dumps(_public(engine), indent=2))
        return
    if args.alpha_only:
        save = _writer(args.out / "quant_alpha.json", {**header, "policy": "smoe", "cache": 0.5})
        fp32 = _engine_run(files["F32"], ids, CacheConfig(fraction=0.5))
        curve = alpha_curve(
            files["Q4_K_M"], ids, fp32, saved=lambda r: save("alpha_curve_q4_k_m", r)
        )
        print(json.dumps(curve, indent=2))
        return
    print("schemes (experts quantized up front):", flush=True)
    schemes = scheme_study(model_dir, ids)
    engine = _engine_runs(files, ids, lambda runs: None)
    print("alpha curve (Q4_K_M, policy smoe, cache 0.5):", flush=True)
    curve = alpha_curve(files["Q4_K_M"], ids, engine["F32"])
    speed = _speed(model_dir, files, ids[:, :32], args.rounds, 0.5)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"), "machine": _machine(),
        "model": str(model_dir), "tokens": int(ids.shape[1]),
        "schemes": schemes, "engine": _public(engine), "alpha_curve_q4_k_m": curve,
        "decode_tokens_per_second": speed,
    }  # fmt: skip
    write_text_atomic(args.out / "quant_study.json", json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
