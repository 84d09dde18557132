"""Tiny checkpoints for tests: a byte-level BPE tokenizer with a chat template and a small MoE.

Everything is built from configs and a few sentences inside the test's temporary folder, so no
test downloads anything. ``save_tiny_checkpoint`` writes a folder the engine loads like a real
model folder (``config.json``, ``model.safetensors``, tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged that a single man must be in want of a wife.",
    "In the beginning God created the heaven and the earth.",
    "Python is a programming language that lets you work quickly.",
    "Hello, how are you today? I am fine, thank you.",
    "Le café est très bon. Über die Brücke gehen. 日本語のテキスト。",
    "def main(): return 42",
]


def build_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (multi-byte characters split across tokens) with a template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2_moe_config(vocab_size: int, **overrides: object) -> Qwen2MoeConfig:
    """A 2-layer Qwen2-MoE (gated shared expert) with hidden size 32 and 4 experts, top-2."""
    settings: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    return Qwen2MoeConfig(**settings)  # type: ignore[arg-type]


def build_tiny_moe(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """Random tiny Qwen2-MoE in fp32, eval mode, eager experts (the exactness reference)."""
    torch.manual_seed(seed)
    config = tiny_qwen2_moe_config(len(tokenizer), **overrides)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = Qwen2MoeForCausalLM(config).eval()
    model.set_experts_implementation("eager")
    return model


def save_tiny_checkpoint(
    directory: Path, seed: int = 0, **overrides: object
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Write a loadable model folder to ``directory``; returns the model and tokenizer it holds."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_moe(tokenizer, seed=seed, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer
