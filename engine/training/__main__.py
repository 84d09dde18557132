"""``python -m engine.training --out DIR --tokens N [--quick]``: the whole recipe end to end.

fetch (cached under ``--cache``) -> corpus split -> tokenizer -> train -> held-out eval ->
model card. ``--quick`` uses tiny dimensions and a tiny budget (the CI test). Later stages
are imported when reached, so a long run picks up the current evaluation and card code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from engine.training.corpus import build_corpus
from engine.training.tokenizer import train_tokenizer
from engine.training.train import (
    QUICK_SPEC,
    TUNE_SPEC,
    ModelSpec,
    TrainResult,
    TrainSpec,
    build_config,
    encode_split,
    new_model,
    save_model,
    train,
)

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "data"
QUICK_TOKENS = 60_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m engine.training", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--tokens", type=int, default=None, help="training budget in tokens")
    p.add_argument("--quick", action="store_true", help="tiny model and budget (CI)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download/corpus cache")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain")
    p.add_argument(
        "--skip-train", action="store_true", help="evaluate and write the card for --out only"
    )
    p.add_argument(
        "--tune-tokens", type=int, default=0, help="second, chat-heavier stage budget in tokens"
    )
    p.add_argument(
        "--resume", type=Path, default=None, help="run only the second stage on this trained folder"
    )
    args = p.parse_args(argv)
    if args.tune_tokens < 0:
        p.error(f"--tune-tokens must not be negative, got {args.tune_tokens}")
    if args.resume is not None and (args.tune_tokens <= 0 or args.skip_train):
        p.error("--resume needs --tune-tokens > 0 and cannot be combined with --skip-train")
    if args.tokens is not None and args.tokens <= 0:
        p.error(f"--tokens must be positive, got {args.tokens}")
    if args.tokens is None and not args.skip_train:
        args.tokens = QUICK_TOKENS if args.quick else 3_500_000
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    """Every stage; returns the summary written to ``training_summary.json``."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sizes = build_corpus(args.cache)
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s: {json.dumps(sizes)}", flush=True)
    corpus = args.cache / "corpus"
    if args.skip_train:
        summary = json.loads((args.out / "training_summary.json").read_text())
    elif args.resume is not None:
        summary = _tune_stage(args, corpus, args.resume)
    else:
        summary = _train_stage(args, corpus, sizes)
        if args.tune_tokens > 0:
            summary = _tune_stage(args, corpus, args.out)
    from engine.training.evaluate import evaluate_model
    from engine.training.model_card import write_card

    summary["eval"] = evaluate_model(args.out, corpus / "heldout", _eval_tokens(args))
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_card(args.out, summary)
    print(f"done in {time.perf_counter() - t0:.1f} s; model in {args.out}")
    return summary


def _eval_tokens(args: argparse.Namespace) -> int:
    if args.eval_tokens is not None:
        return int(args.eval_tokens)
    return 4_000 if args.quick else 120_000


def _train_stage(args: argparse.Namespace, corpus: Path, sizes: dict) -> dict[str, object]:
    vocab = args.vocab or (512 if args.quick else 4096)
    tokenizer = train_tokenizer(corpus / "train", vocab, 400_000 if args.quick else 4_000_000)
    model_spec = QUICK_SPEC if args.quick else ModelSpec()
    train_spec = TrainSpec(tokens=args.tokens, seed=args.seed)
    if args.quick:
        train_spec = replace(train_spec, batch_size=4, checkpoint_every=10**9)
    streams = encode_split(corpus / "train", tokenizer)
    model = new_model(build_config(model_spec, tokenizer), args.seed)
    ckpt = args.cache / "checkpoints" / args.out.name
    result = train(model, tokenizer, streams, train_spec, None if args.quick else ckpt)
    summary = _summary(args, sizes, streams, model_spec, train_spec, result)
    save_model(model, tokenizer, args.out, summary)
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _tune_stage(args: argparse.Namespace, corpus: Path, source: Path) -> dict[str, object]:
    """Stage 2: continue training the model in ``source`` with the chat-heavier mix."""
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    summary = json.loads((source / "training_summary.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = Qwen2MoeForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.output_router_logits = True  # the load-balancing loss stays on
    model.set_experts_implementation("grouped_mm")
    spec = replace(TUNE_SPEC, tokens=args.tune_tokens, seed=args.seed + 1)
    if args.quick:
        spec = replace(spec, batch_size=4, checkpoint_every=10**9)
    streams = encode_split(corpus / "train", tokenizer)
    ckpt = None if args.quick else args.cache / "checkpoints" / f"{args.out.name}-tune"
    result = train(model, tokenizer, streams, spec, ckpt)
    summary.pop("eval", None)
    summary["tune"] = {
        "command": "python -m engine.training " + " ".join(sys.argv[1:]),
        "train_spec": asdict(spec),
        "result": asdict(result),
    }
    save_model(model, tokenizer, args.out, summary)
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(
    args: argparse.Namespace,
    sizes: dict,
    streams: dict[str, torch.Tensor],
    model_spec: ModelSpec,
    train_spec: TrainSpec,
    result: TrainResult,
) -> dict[str, object]:
    import os
    import platform

    return {
        "command": "python -m engine.training " + " ".join(sys.argv[1:]),
        "corpus_chars": sizes,
        "train_stream_tokens": {d: len(s) for d, s in streams.items()},
        "model_spec": asdict(model_spec),
        "train_spec": asdict(train_spec),
        "result": asdict(result),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; a failed fetch is reported in one line with exit status 2."""
    from engine.training.corpus import CorpusFetchError

    args = parse_args(argv)
    try:
        run(args)
    except CorpusFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
