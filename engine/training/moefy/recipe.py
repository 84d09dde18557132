"""The recipe end to end: dense wheel -> calibration inputs -> partition, routers, refit -> files.

Per layer: neuron contributions on the calibration inputs give the shared expert and the
balanced co-activation clusters (``partition``); the router is trained against the dense
layer (``router``); the shared down-projection is refitted. The learned parts go to the
recipe folder; the checkpoint is then assembled from them exactly as a first run does and its
hash recorded.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.training.corpus import build_corpus
from engine.training.moefy import source
from engine.training.moefy.collect import calibration_streams, ffn_inputs
from engine.training.moefy.convert import MoeShape, check_dense
from engine.training.moefy.learned import Learned, save_learned
from engine.training.moefy.partition import activations, contributions, neuron_order
from engine.training.moefy.router import (
    LayerExperts,
    RouterSpec,
    layer_errors,
    refit_shared_down,
    train_router,
)

DEFAULT_SHAPE = MoeShape(experts=32, expert_size=32, shared=512, top_k=8)


@dataclass(frozen=True)
class RecipeSpec:
    """Calibration budget and training settings of one recipe run."""

    shape: MoeShape = field(default_factory=lambda: DEFAULT_SHAPE)
    tokens_per_domain: int = 4000
    check_tokens: int = 1500  # calibration tokens kept back for the per-layer error report
    router: RouterSpec = field(default_factory=lambda: RouterSpec(epochs=3))
    ridge: float = 1e-3
    seed: int = 0


def split_inputs(x: torch.Tensor, keep: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` shuffled and split into (train, check) with ``keep`` rows in check."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[keep:]].float(), x[perm[:keep]].float()


def learn_layer(
    x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], spec: RecipeSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Order [I], router [E, H], shared down [H, S] and check errors of one layer."""
    gate, up, down = weights
    train, check = split_inputs(x, spec.check_tokens, spec.seed)
    order = neuron_order(contributions(activations(train, gate, up), down), spec.shape, spec.seed)
    experts = LayerExperts.cut(gate, up, down, order, spec.shape)
    router = train_router(train, experts, spec.shape, spec.router)
    before = layer_errors(check, experts, router, spec.shape)
    shared_down = refit_shared_down(train, experts, router, spec.shape, spec.ridge)
    after = layer_errors(check, experts.with_shared_down(shared_down), router, spec.shape)
    errors = {"router": before["router"], "oracle": before["oracle"], "refit": after["router"]}
    return order, router, shared_down, errors


def learn(dense: Any, inputs: list[torch.Tensor], spec: RecipeSpec) -> tuple[Learned, list]:
    """Every layer's learned parts, and the per-layer error report."""
    state = dense.state_dict()
    orders, routers, downs, report = [], [], [], []
    for layer, x in enumerate(inputs):
        t0 = time.perf_counter()
        pre = f"model.layers.{layer}.mlp."
        weights = tuple(state[pre + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        order, router, down, errors = learn_layer(x, weights, spec)  # type: ignore[arg-type]
        orders.append(order)
        routers.append(router)
        downs.append(down)
        report.append(errors)
        print(
            f"layer {layer}: FFN relative error router {errors['router']:.3f} "
            f"(oracle {errors['oracle']:.3f}), after refit {errors['refit']:.3f}, "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    learned = Learned(torch.stack(orders), torch.stack(routers), torch.stack(downs), spec.shape, {})
    return learned, report


def run_recipe(out: Path, cache: Path, spec: RecipeSpec) -> dict[str, Any]:
    """Fetch, calibrate, learn and write the learned parts into ``out``; returns the record."""
    t0 = time.perf_counter()
    gguf = source.extract_gguf(source.fetch_wheel(cache / "pkgs"), cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    check_dense(dense.config)
    build_corpus(cache)
    streams = calibration_streams(cache / "corpus" / "train", tokenizer, spec.tokens_per_domain)
    inputs = ffn_inputs(dense, streams)
    print(f"calibration: {len(inputs[0])} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    learned, report = learn(dense, inputs, spec)
    from engine.training.moefy.assemble import sha256_file

    record = {
        "source": {
            "wheel": f"{source.WHEEL_NAME}=={source.WHEEL_VERSION}",
            "gguf": source.GGUF_MEMBER,
            "gguf_sha256": sha256_file(gguf),
        },
        "recipe": {**asdict(spec), "calibration_tokens": len(inputs[0])},
        "layer_errors": report,
        "recipe_seconds": round(time.perf_counter() - t0, 1),
    }
    save_learned(
        out, Learned(learned.orders, learned.routers, learned.shared_downs, spec.shape, record)
    )
    return record


def record_model_hash(recipe: Path, sha: str) -> None:
    """Store the assembled checkpoint's hash in the recipe record."""
    from engine.atomic import write_bytes_atomic
    from engine.training.moefy.learned import RECORD

    record = json.loads((recipe / RECORD).read_text())
    record["model_sha256"] = sha
    write_bytes_atomic(recipe / RECORD, (json.dumps(record, indent=2) + "\n").encode())


def run_distill(recipe: Path, cache: Path, spec: Any) -> dict[str, Any]:
    """Distil the recipe's routers and shared downs; keep the result only if it pays."""
    from engine.training.moefy.convert import build_moe
    from engine.training.moefy.distill import distill, learned_tensors, perplexity
    from engine.training.moefy.learned import load_learned

    learned = load_learned(recipe)
    gguf = source.extract_gguf(source.fetch_wheel(cache / "pkgs"), cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    moe = build_moe(
        dense, learned.orders, learned.routers, learned.shape, learned.shared_downs.float()
    )
    train = torch.cat(
        list(calibration_streams(cache / "corpus" / "train", tokenizer, 20_000).values())
    )
    held = [
        s[:512] for s in calibration_streams(cache / "corpus" / "heldout", tokenizer, 512).values()
    ]
    before = {"dense": perplexity(dense, held), "moe": perplexity(moe, held)}
    print(f"held-out perplexity before: {before}", flush=True)
    losses = distill(dense, moe, train, spec)
    after = perplexity(moe, held)
    print(f"held-out perplexity after: {after:.2f}", flush=True)
    report = {
        "spec": asdict(spec), "ppl_before": before, "ppl_after": after,
        "kl_first10": sum(losses[:10]) / 10, "kl_last10": sum(losses[-10:]) / 10,
        "kept": after < before["moe"],
    }  # fmt: skip
    if report["kept"]:
        routers, downs = learned_tensors(moe)
        record = {**learned.record, "distill": report}
        save_learned(recipe, Learned(learned.orders, routers, downs, learned.shape, record))
    return report


def held_out_quality(dense: Any, moe: Any, held: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Quick held-out check: per text kind perplexities and top-1 agreement, and the mean
    perplexity ratio MoE / dense over the kinds (what a refit must lower to be kept)."""
    from engine.training.moefy.measure import compare_stream

    kinds = {kind: compare_stream(dense, moe, stream) for kind, stream in held.items()}
    ratios = [k["ppl_moe"] / k["ppl_dense"] for k in kinds.values()]
    return {"kinds": kinds, "mean_ppl_ratio": sum(ratios) / len(ratios)}


def shuffled_windows(streams: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
    """All streams cut into windows, in a seeded random order (domains mixed)."""
    from engine.training.moefy.collect import windows

    cut = [w for stream in streams.values() for w in windows(stream)]
    perm = torch.randperm(len(cut), generator=torch.Generator().manual_seed(seed))
    return [cut[i] for i in perm.tolist()]


def run_refit(
    recipe: Path, cache: Path, spec: Any, tokens_per_domain: int, eval_tokens: int = 512
) -> dict[str, Any]:
    """Sequentially tune and refit every layer's experts (``refit``); keep it only if it pays
    on held-out text (mean perplexity ratio to dense falls)."""
    from engine.training.moefy.convert import build_moe
    from engine.training.moefy.learned import load_learned
    from engine.training.moefy.refit import refit, weights_in_dense_order

    t0 = time.perf_counter()
    learned = load_learned(recipe)
    gguf = source.extract_gguf(source.fetch_wheel(cache / "pkgs"), cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    moe = build_moe(
        dense, learned.orders, learned.routers, learned.shape, learned.shared_downs.float(),
        {name: tensor.float() for name, tensor in learned.ffn.items()},
    )  # fmt: skip
    held = calibration_streams(cache / "corpus" / "heldout", tokenizer, eval_tokens)
    before = held_out_quality(dense, moe, held)
    print(f"held-out before: mean perplexity ratio {before['mean_ppl_ratio']:.3f}", flush=True)
    train = calibration_streams(cache / "corpus" / "train", tokenizer, tokens_per_domain)
    layers = refit(dense, moe, shuffled_windows(train, 0), learned.shape, spec)
    after = held_out_quality(dense, moe, held)
    print(f"held-out after: mean perplexity ratio {after['mean_ppl_ratio']:.3f}", flush=True)
    report = {
        "spec": asdict(spec), "calibration_tokens": sum(len(s) for s in train.values()),
        "layer_errors": layers, "held_out_before": before, "held_out_after": after,
        "kept": after["mean_ppl_ratio"] < before["mean_ppl_ratio"],
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    if report["kept"]:
        ffn = weights_in_dense_order(moe, learned.orders, learned.shape)
        tuned = (
            {"down"}
            | ({"up"} if spec.tune else set())
            | ({"gate"} if spec.tune and spec.tune.tune_gate else set())
        )
        ffn = {n: t for n, t in ffn.items() if n in tuned or n in learned.ffn}
        record = {**learned.record, "refit": report}
        record.pop("model_sha256", None)
        save_learned(
            recipe,
            Learned(
                learned.orders, learned.routers, learned.shared_downs, learned.shape, record, ffn
            ),
        )
    return report


def _e2e_learned(base: Learned, student: Any, record: dict[str, Any]) -> Learned:
    """``base`` with the student's routers and low-rank deltas (and ``record``)."""
    from engine.training.moefy.e2e import trained_parts

    routers, lora = trained_parts(student)
    return Learned(
        base.orders, routers, base.shared_downs, base.shape, record, dict(base.ffn), lora
    )


def run_distill_e2e(
    recipe: Path, cache: Path, spec: Any, checkpoint: Path, resume: bool = False
) -> dict[str, Any]:
    """End-to-end distillation (``e2e``) of the recipe's MoE against the dense model, with
    checkpoints in ``checkpoint``; kept in ``recipe`` only if the held-out mean perplexity
    ratio to dense falls. ``resume`` starts from the checkpoint (``spec.tokens`` 0: only
    evaluate it)."""
    from engine.training.moefy.e2e import HeldOut, build_student, train_e2e
    from engine.training.moefy.learned import load_learned

    t0 = time.perf_counter()
    base = load_learned(recipe)
    start = load_learned(checkpoint) if resume else base
    gguf = source.extract_gguf(source.fetch_wheel(cache / "pkgs"), cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    held = calibration_streams(cache / "corpus" / "heldout", tokenizer, 512)
    before = held_out_quality(dense, build_student(dense, base, 1), held)
    print(f"held-out before: mean perplexity ratio {before['mean_ppl_ratio']:.3f}", flush=True)
    student = build_student(dense, start, spec.rank, spec.seed)
    log: dict[str, Any] = {}
    if spec.tokens:
        train = torch.cat(
            list(calibration_streams(cache / "corpus" / "train", tokenizer, 60_000).values())
        )
        watch = HeldOut.of(dense, [s[:128] for s in held.values()])

        def save(step: int) -> None:
            save_learned(checkpoint, _e2e_learned(base, student, {**base.record, "step": step}))

        log = train_e2e(dense, student, train, watch, spec, save)
    after = held_out_quality(dense, student, held)
    print(f"held-out after: mean perplexity ratio {after['mean_ppl_ratio']:.3f}", flush=True)
    report = {
        "spec": asdict(spec), "resumed": resume, "log": log, "held_out_before": before,
        "held_out_after": after, "kept": after["mean_ppl_ratio"] < before["mean_ppl_ratio"],
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    if report["kept"]:
        record = {k: v for k, v in base.record.items() if k != "model_sha256"}
        save_learned(recipe, _e2e_learned(base, student, {**record, "distill_e2e": report}))
    return report


def run_ceiling(recipe: Path, cache: Path, eval_tokens: int, out: Path) -> list[dict[str, Any]]:
    """``ceiling`` on the recipe's neuron orders over ``eval_tokens`` held-out tokens per
    domain; writes the rows, the settings and the table to ``out`` (JSON)."""
    from engine.atomic import write_bytes_atomic
    from engine.training.moefy.ceiling import DEFAULT_CUTS, ceiling, markdown
    from engine.training.moefy.learned import load_learned

    t0 = time.perf_counter()
    orders = load_learned(recipe).orders
    gguf = source.extract_gguf(source.fetch_wheel(cache / "pkgs"), cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    held = calibration_streams(cache / "corpus" / "heldout", tokenizer, eval_tokens)
    rows = ceiling(dense, orders, DEFAULT_CUTS, held)
    table = markdown(rows)
    print(table, flush=True)
    result = {
        "rows": rows, "eval_tokens_per_domain": eval_tokens, "table": table,
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
    }  # fmt: skip
    write_bytes_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    return rows
