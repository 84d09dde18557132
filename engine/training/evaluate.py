"""Held-out evaluation of a trained model folder: perplexity, routing statistics, samples.

Perplexity is measured per domain on non-overlapping windows of the held-out token stream.
Routing statistics come from the same forward passes: the mean entropy of each token's
router distribution (against ``log E``, the uniform value) and how often each expert is
picked per domain, from which a specialisation score (Jensen-Shannon divergence between
the domains' expert-usage distributions, in bits, mean over layers) is derived.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from engine.training.corpus import DOMAINS
from engine.training.train import encode_domain

SAMPLE_PROMPTS = (
    "Hello! How are you today?",
    "How do I open a file in Python?",
    "What do you think of marriage?",
)


@dataclass(frozen=True)
class DomainEval:
    """Held-out numbers of one domain."""

    tokens: int
    nll: float
    perplexity: float
    router_entropy: float  # mean per-token entropy of the router softmax, nats
    usage: list[list[float]]  # [layer][expert] share of top-k picks


def load(model_dir: Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """Model (eval mode, fp32) and tokenizer of a folder, with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


@torch.no_grad()
def eval_stream(model: Any, stream: torch.Tensor, max_tokens: int) -> DomainEval:
    """Perplexity and routing statistics on windows of ``stream`` ([N] token ids)."""
    context = model.config.max_position_embeddings
    experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    stream = stream[: max(max_tokens, 2)]
    nll_sum, count, ent_sum, routed = 0.0, 0, 0.0, 0
    usage = torch.zeros(model.config.num_hidden_layers, experts)  # [L, E]
    for start in range(0, len(stream) - 1, context):
        window = stream[start : start + context].unsqueeze(0)  # [1, T]
        if window.shape[1] < 2:
            break
        out = model(input_ids=window, labels=window, output_router_logits=True)
        n = window.shape[1] - 1
        nll_sum, count = nll_sum + float(out.loss) * n, count + n
        for layer, logits in enumerate(out.router_logits):  # logits: [T, E]
            probs = torch.softmax(logits.float(), dim=-1)
            ent_sum += float(-(probs * probs.clamp_min(1e-12).log()).sum())
            picks = probs.topk(top_k, dim=-1).indices.flatten()  # [T*k]
            usage[layer] += torch.bincount(picks, minlength=experts).float()
        routed += window.shape[1] * len(out.router_logits)
    nll = nll_sum / max(count, 1)
    usage = usage / usage.sum(dim=-1, keepdim=True).clamp_min(1)
    return DomainEval(count, nll, math.exp(nll), ent_sum / max(routed, 1), usage.tolist())


def js_divergence_bits(dists: torch.Tensor) -> float:
    """Jensen-Shannon divergence (bits) among the rows of ``dists`` ([D, E], rows sum to 1)."""
    mean = dists.mean(dim=0)  # [E]

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log2()).sum(dim=-1)

    return float(entropy(mean) - entropy(dists).mean())


def specialisation(evals: dict[str, DomainEval]) -> float:
    """Mean over layers of the JS divergence between domains' expert usage (bits)."""
    usage = torch.tensor([e.usage for e in evals.values()])  # [D, L, E]
    layers = usage.shape[1]
    return sum(js_divergence_bits(usage[:, layer]) for layer in range(layers)) / layers


def chat_reply(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new: int = 60
) -> str:
    """A greedy reply through ``apply_chat_template`` + ``generate``."""
    messages = [{"role": "user", "content": prompt}]
    ids: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=max_new, do_sample=False)  # [1, P + new]
    return str(
        tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    ).strip()


def evaluate_model(model_dir: Path, heldout_dir: Path, max_tokens: int) -> dict[str, object]:
    """Every held-out number and the sample replies, as a JSON-ready dict."""
    model, tokenizer = load(model_dir)
    evals = {
        d: eval_stream(model, encode_domain(heldout_dir / f"{d}.jsonl", tokenizer), max_tokens)
        for d in DOMAINS
    }
    for domain, result in evals.items():
        print(
            f"held-out {domain}: {result.tokens} tokens, perplexity {result.perplexity:.2f}",
            flush=True,
        )
    return {
        "domains": {d: asdict(e) for d, e in evals.items()},
        "uniform_entropy": math.log(model.config.num_experts),
        "specialisation_bits": specialisation(evals),
        "samples": [
            {"prompt": p, "reply": chat_reply(model, tokenizer, p)} for p in SAMPLE_PROMPTS
        ],
    }
