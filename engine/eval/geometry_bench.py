"""Decode speed on real model geometries with random weights (the GPU check's benchmark).

``python -m engine.eval.geometry_bench --out DIR`` builds, in a scratch folder, checkpoints with
the geometry of Qwen1.5-MoE-A2.7B (24 layers, 60 experts top-4 plus the shared expert) and of
Mixtral-8x7B (8 of its 32 layers; per-layer figures are scaled to 32 in the report) with random
bf16 weights, then measures greedy decode tokens/s of:

- plain transformers fully on the GPU (the ceiling a user with a big card gets);
- plain transformers with accelerate's ``device_map`` CPU offload at the same GPU budget as
  the cache (what a user would try first);
- the engine with every expert resident, and at each cache fraction LRU, LFU, smoe at alpha 0
  and at the default alpha.

Routing: random weights route almost uniformly, which is not how real models route, so each
decode step's top-k of the layers the real traces cover (``tests/data/traces``, copied from the
shared reference traces) is replaced by the recorded choice of the same step; other layers keep
the router's own (synthetic) scores. Writes ``geometry_bench.json`` and ``geometry_bench.md``.
``--quick`` shrinks every dimension so the whole path runs on a CPU in seconds (a smoke test,
not a measurement).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.eval.traces import load_trace
from engine.paths import builtin_model_dir

TRACES = Path(__file__).resolve().parents[2] / "tests" / "data" / "traces"
DEFAULT_ALPHA = 0.3


@dataclass(frozen=True)
class GeometrySpec:
    """A real model's shape, the layers built, and the trace that drives its routing."""

    name: str
    model_type: str
    config: dict[str, Any]
    built_layers: int
    real_layers: int
    trace: str
    trace_layers: tuple[int, ...] = ()  # model layer of each trace column (default: 0..n-1)

    def shrunk(self) -> GeometrySpec:
        """Every dimension divided down: the same code path, CPU-sized."""
        small = dict(self.config)
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in small:
                small[key] = max(32, small[key] // 64)
        if "shared_expert_intermediate_size" in small:
            small["shared_expert_intermediate_size"] = 64
        small.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
        return replace(self, config=small, built_layers=min(self.built_layers, 4))


QWEN15 = GeometrySpec(
    "Qwen1.5-MoE-A2.7B",
    "qwen2_moe",
    dict(
        hidden_size=2048,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        intermediate_size=5632,
        num_experts=60,
        num_experts_per_tok=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=151936,
        norm_topk_prob=False,
        qkv_bias=True,
    ),
    built_layers=24,
    real_layers=24,
    trace="qwen15moe_gsm8k25_decode.npz",
)
MIXTRAL = GeometrySpec(
    "Mixtral-8x7B",
    "mixtral",
    dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    built_layers=4,  # 4 of 32 layers (~23 GB of bf16 with the embeddings): fits a short loan
    real_layers=32,
    trace="mixtral8x7b_gsm8k_p0_decode.npz",
)
SPECS = {"qwen15moe": QWEN15, "mixtral": MIXTRAL}


def build_checkpoint(spec: GeometrySpec, folder: Path, device: str) -> Path:
    """Random bf16 weights of ``spec`` saved as safetensors, with the built-in tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        spec.model_type,
        num_hidden_layers=spec.built_layers,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **spec.config,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    del model
    for source in builtin_model_dir().iterdir():
        if source.name.startswith("tokenizer") or source.name == "chat_template.jinja":
            (folder / source.name).write_bytes(source.read_bytes())
    return folder


@dataclass
class TraceRouting:
    """Replaces the covered layers' top-k by a trace's recorded choice, step by step."""

    experts: np.ndarray  # [steps, layers, k]
    weights: np.ndarray  # [steps, layers, k]
    columns: dict[int, int]  # model layer -> trace column
    num_experts: int
    step: int = 0

    def rewrite(
        self, layer: int, scores: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        column = self.columns.get(layer)
        if column is None or idx.shape[0] != 1:
            return idx, w
        row = self.experts[self.step % len(self.experts), column]
        if (row < 0).any() or (row >= self.num_experts).any() or len(row) != idx.shape[1]:
            return idx, w
        chosen = torch.from_numpy(row.astype(np.int64)).to(idx.device, idx.dtype)[None]
        weights = self.weights[self.step % len(self.weights), column].astype(np.float32)
        return chosen, torch.from_numpy(weights).to(w.device, w.dtype)[None]


def trace_routing(spec: GeometrySpec, built_layers: int, num_experts: int) -> TraceRouting | None:
    """The trace's first request, its columns mapped to the built layers they cover."""
    path = TRACES / spec.trace
    if not path.is_file():
        return None
    trace = load_trace(path)
    first = trace.seq_id == trace.seq_id[0]
    with np.load(path) as data:
        layer_ids = [int(x) for x in data["layer_ids"]]
    columns = {layer: c for c, layer in enumerate(layer_ids) if layer < built_layers}
    return TraceRouting(trace.experts[first], trace.weights[first], columns, num_experts)


def decode_speed(
    model: Any, vocab: int, tokens: int, device: str, on_step: Callable[[], None]
) -> float:
    """Greedy decode tokens/s after a 16-token prompt (device synchronised around the run)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(tokens):
            on_step()
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
        _sync(device)
    return tokens / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Row:
    geometry: str
    config: str
    cache_fraction: float | None
    tokens_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)


def _engine_rows(
    spec: GeometrySpec, folder: Path, fraction: float, args: argparse.Namespace
) -> list[Row]:
    """One load at ``fraction``; each policy switched live, the cache emptied between them."""
    from engine.runtime.loading import load_model

    config = LoadConfig(
        folder,
        device=args.device,
        dtype="bfloat16",
        cache=CacheConfig(fraction=fraction),
        force=True,
    )
    loaded = load_model(config)
    offload = loaded.offload
    routing = trace_routing(spec, spec.built_layers, loaded.info.experts_per_layer)
    policies = (
        {"all-resident": LiveOptions()}
        if fraction >= 1.0
        else {
            "lru": LiveOptions(),
            "lfu": LiveOptions(policy="lfu"),
            "smoe alpha 0": LiveOptions(policy="smoe", alpha=0.0),
            f"smoe alpha {DEFAULT_ALPHA}": LiveOptions(policy="smoe", alpha=DEFAULT_ALPHA),
        }
    )
    rows = []
    for name, live in policies.items():
        offload.set_live_options(live)
        offload.cache.clear()
        offload.reset_stats()
        if routing is not None:
            routing.step = 0
            for wrapper in offload.routers.values():
                wrapper.rewrite = routing.rewrite

        def step(routing: TraceRouting | None = routing) -> None:
            if routing is not None:
                routing.step += 1
            offload.end_step(1)

        speed = decode_speed(loaded.model, loaded.info.vocab_size, args.tokens, args.device, step)
        stats = offload.stats()
        extra = {
            "hit_rate": stats.hits / max(1, stats.hits + stats.misses),
            "substitutions": stats.substitutions,
        }
        rows.append(Row(spec.name, f"engine {name}", fraction, speed, extra))
    offload.close()
    del loaded
    return rows


def _plain_rows(
    spec: GeometrySpec, folder: Path, fraction: float, args: argparse.Namespace
) -> list[Row]:
    """Plain transformers fully on the device, and with accelerate's CPU offload."""
    from transformers import AutoModelForCausalLM

    rows = []
    vocab = int(spec.config["vocab_size"])
    if args.device.startswith("cuda"):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map=args.device
        )
        rows.append(
            Row(
                spec.name,
                "transformers on GPU",
                None,
                decode_speed(model, vocab, args.tokens, args.device, _nothing),
            )
        )
        del model
        torch.cuda.empty_cache()
        rows += _accelerate_rows(spec, folder, fraction, args)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        rows.append(
            Row(
                spec.name,
                "transformers on CPU",
                None,
                decode_speed(model, vocab, args.tokens, "cpu", _nothing),
            )
        )
    return rows


def _accelerate_rows(
    spec: GeometrySpec, folder: Path, fraction: float, args: argparse.Namespace
) -> list[Row]:
    """transformers with accelerate's CPU offload at the cache's share of the weights."""
    from transformers import AutoModelForCausalLM

    try:
        import accelerate  # noqa: F401  (device_map="auto" needs it)
    except ImportError:
        return [
            Row(
                spec.name,
                "transformers + accelerate CPU offload",
                fraction,
                0.0,
                {"skipped": "accelerate is not installed (pip extra: bench)"},
            )
        ]
    budget = int(_checkpoint_bytes(folder) * fraction)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="auto", max_memory={0: budget, "cpu": "200GiB"}
    )
    vocab = int(spec.config["vocab_size"])
    speed = decode_speed(model, vocab, max(4, args.tokens // 4), args.device, _nothing)
    del model
    torch.cuda.empty_cache()
    return [Row(spec.name, "transformers + accelerate CPU offload", fraction, speed)]


def _nothing() -> None:
    return None


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(
    args: argparse.Namespace, on_rows: Callable[[list[Row]], None] | None = None
) -> dict[str, Any]:
    """Build each geometry, measure every configuration, return the result document.

    Each geometry's checkpoint is deleted before the next is built (disk), and ``on_rows`` sees
    the rows so far after every measurement (``main`` rewrites the files: a run stopped by the
    GPU check's time budget keeps what it measured).
    """
    rows: list[Row] = []
    for key in args.geometries:
        spec = SPECS[key].shrunk() if args.quick else SPECS[key]
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            folder = build_checkpoint(spec, Path(scratch) / key, args.device)
            steps = [(_plain_rows, args.cache_fractions[-1]), (_engine_rows, 1.0)]
            steps += [(_engine_rows, fraction) for fraction in args.cache_fractions]
            for measure, fraction in steps:
                rows += measure(spec, folder, fraction, args)
                if on_rows is not None:
                    on_rows(rows)
    return _document(args, rows)


def _document(args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    return {
        "command": "python -m engine.eval.geometry_bench",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "machine": platform.node(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "tokens": args.tokens,
        "rows": [row.__dict__ for row in rows],
        "scale": {spec.name: spec.real_layers / spec.built_layers for spec in SPECS.values()},
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a table; Mixtral's per-layer speed scaled to its 32 layers."""
    lines = [
        f"Decode tokens/s, {result['device']}, {result['date']}"
        + (" (QUICK: shrunk geometry, a smoke test, not a measurement)" if result["quick"] else ""),
        "",
        "| geometry | configuration | cache | tok/s (built layers) | tok/s scaled to all layers "
        "| hit rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        scale = result["scale"].get(row["geometry"], 1.0)
        cache = "-" if row["cache_fraction"] is None else f"{row['cache_fraction']:.0%}"
        hit = row["extra"].get("hit_rate")
        lines.append(
            f"| {row['geometry']} | {row['config']} | {cache} | {row['tokens_per_second']:.1f} "
            f"| {row['tokens_per_second'] / scale:.1f} | {'-' if hit is None else f'{hit:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.eval.geometry_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--geometries", nargs="+", choices=sorted(SPECS), default=["qwen15moe", "mixtral"]
    )
    parser.add_argument("--cache-fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--scratch", type=Path, default=None, help="where checkpoints are built")
    parser.add_argument("--quick", action="store_true", help="shrunk geometry: a smoke test")
    parser.add_argument(
        "--stem", default="geometry_bench", help="output file names: STEM.json and STEM.md"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args, lambda rows: _write(args, _document(args, rows)))
    _write(args, result)
    print(markdown(result))
    return 0


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """STEM.json and STEM.md in ``--out``, each through a temporary file and a rename."""
    for name, text in (
        (f"{args.stem}.json", json.dumps(result, indent=2)),
        (f"{args.stem}.md", markdown(result)),
    ):
        temporary = args.out / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(args.out / name)


if __name__ == "__main__":
    raise SystemExit(main())
