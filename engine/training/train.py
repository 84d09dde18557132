"""Train the built-in fine-grained MoE (``Qwen2MoeForCausalLM``) on CPU from the corpus.

Budget in tokens, fixed seed, AdamW with warm-up and cosine decay, the load-balancing loss
on (``output_router_logits=True``). Sequences are windows of one domain, the domain drawn
by fixed weights, so the chat template is learned alongside the text. Checkpoints are
written periodically so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2MoeConfig, Qwen2MoeForCausalLM

from engine.training.corpus import DOMAINS, read_jsonl


@dataclass(frozen=True)
class ModelSpec:
    """Model dimensions (Qwen2-MoE: a gated shared expert plus small routed experts)."""

    hidden_size: int = 256
    num_layers: int = 5
    num_heads: int = 8
    num_kv_heads: int = 4
    num_experts: int = 32
    top_k: int = 4
    expert_intermediate: int = 64
    shared_intermediate: int = 512
    context: int = 512
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.01


QUICK_SPEC = ModelSpec(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    expert_intermediate=32,
    shared_intermediate=64,
    context=128,
)


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings; ``tokens`` is the budget of training tokens."""

    tokens: int
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    checkpoint_every: int = 200
    domain_weights: tuple[tuple[str, float], ...] = (
        ("austen", 0.28),
        ("bible", 0.22),
        ("python_docs", 0.32),
        ("chat", 0.18),
    )


TUNE_SPEC = TrainSpec(
    tokens=0,
    lr=1e-3,
    domain_weights=(("austen", 0.25), ("bible", 0.1), ("python_docs", 0.3), ("chat", 0.35)),
)


@dataclass(frozen=True)
class TrainResult:
    """What the model card reports about the run."""

    tokens_seen: int
    steps: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    parameters: int


def build_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> Qwen2MoeConfig:
    """The ``Qwen2MoeConfig`` of the model: every layer sparse, embeddings tied."""
    return Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.shared_intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.context,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_intermediate,
        shared_expert_intermediate_size=spec.shared_intermediate,
        norm_topk_prob=spec.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=True,
        router_aux_loss_coef=spec.aux_loss_coef,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def render_rows(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts of one JSONL split file; chats rendered with the chat template."""
    texts = []
    for row in read_jsonl(path):
        if "messages" in row:
            texts.append(str(tokenizer.apply_chat_template(row["messages"], tokenize=False)))
        else:
            texts.append(str(row["text"]))
    return texts


def encode_domain(path: Path, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """One long token stream of a domain, items separated by ``<|endoftext|>``."""
    sep = tokenizer.pad_token_id
    ids: list[int] = []
    for text in render_rows(path, tokenizer):
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)  # [N]


def encode_split(folder: Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Token streams per domain of one split folder."""
    return {d: encode_domain(folder / f"{d}.jsonl", tokenizer) for d in DOMAINS}


class BatchSampler:
    """Random windows of ``context`` tokens, the domain of each row drawn by weight."""

    def __init__(
        self, streams: dict[str, torch.Tensor], weights: dict[str, float], context: int, seed: int
    ) -> None:
        self.domains = [d for d in weights if len(streams[d]) > context + 1]
        if not self.domains:
            raise ValueError(f"no domain has more than {context + 1} tokens to train on")
        self.streams = streams
        self.probs = torch.tensor([weights[d] for d in self.domains])
        self.context = context
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        picks = torch.multinomial(self.probs, batch_size, replacement=True, generator=self.gen)
        for pick in picks.tolist():
            stream = self.streams[self.domains[pick]]
            start = int(torch.randint(len(stream) - self.context, (1,), generator=self.gen))
            rows.append(stream[start : start + self.context])
        return torch.stack(rows)  # [B, T]


def lr_at(step: int, total: int, spec: TrainSpec) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    warmup = max(1, int(total * spec.warmup_fraction))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    return spec.lr * cosine_floor((step - warmup) / max(1, total - warmup), spec.min_lr_ratio)


def cosine_floor(progress: float, floor: float) -> float:
    """Cosine decay from 1 to ``floor`` as ``progress`` goes from 0 to 1 (held after 1)."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return floor + (1.0 - floor) * cosine


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the router."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        plain = param.ndim < 2 or name.endswith("gate.weight") or "norm" in name
        (no_decay if plain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))


def new_model(config: Qwen2MoeConfig, seed: int) -> Qwen2MoeForCausalLM:
    """A freshly initialised model (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    model.set_experts_implementation("grouped_mm")
    return model


def save_model(
    model: Qwen2MoeForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, meta: dict
) -> None:
    """``save_pretrained`` of model and tokenizer plus ``training_state.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    training_flag = model.config.output_router_logits
    model.config.output_router_logits = False  # inference needs no aux loss
    model.save_pretrained(out)
    model.config.output_router_logits = training_flag
    tokenizer.save_pretrained(out)
    (out / "training_state.json").write_text(json.dumps(meta, indent=2))


def train(
    model: Qwen2MoeForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    streams: dict[str, torch.Tensor],
    spec: TrainSpec,
    checkpoint_dir: Path | None = None,
    log_every: int = 10,
) -> TrainResult:
    """Train in place for ``spec.tokens`` tokens; prints progress, wall time and tokens/s."""
    context = model.config.max_position_embeddings
    sampler = BatchSampler(streams, dict(spec.domain_weights), context, spec.seed)
    steps = max(1, spec.tokens // (spec.batch_size * context))
    optimizer = make_optimizer(model, spec)
    model.train()
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, spec)
        loss_value, aux = _step(model, optimizer, sampler.batch(spec.batch_size), spec.grad_clip)
        if step % log_every == 0 or step == steps - 1:
            _log(step, steps, loss_value, aux, (step + 1) * spec.batch_size * context, start)
        if checkpoint_dir and (step + 1) % spec.checkpoint_every == 0:
            meta = {"step": step + 1, "loss": loss_value, "spec": asdict(spec)}
            save_model(model, tokenizer, checkpoint_dir, meta)
    seconds = time.perf_counter() - start
    seen = steps * spec.batch_size * context
    print(f"training took {seconds:.1f} s for {seen} tokens ({seen / seconds:.0f} tokens/s)")
    params = sum(p.numel() for p in model.parameters())
    return TrainResult(seen, steps, seconds, seen / seconds, loss_value, params)


def _step(
    model: Qwen2MoeForCausalLM,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,  # [B, T]
    grad_clip: float,
) -> tuple[float, float]:
    out = model(input_ids=batch, labels=batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
    return float(out.loss), aux


def _log(step: int, steps: int, loss: float, aux: float, seen: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    print(
        f"step {step + 1}/{steps} loss {loss:.4f} aux {aux:.4f} tokens {seen} "
        f"elapsed {elapsed:.0f}s ({seen / max(elapsed, 1e-9):.0f} tok/s)",
        flush=True,
    )
