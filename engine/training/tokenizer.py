"""A byte-level BPE tokenizer with a ChatML chat template, trained with ``tokenizers``.

Saved as a ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained`` and
``apply_chat_template`` work on the model folder. ``<|im_end|>`` is the end-of-sequence token:
generation stops at the end of the assistant turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engine.training.corpus import read_jsonl

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus_texts(train_dir: Path, max_chars: int) -> Iterator[str]:
    """Training texts (documents and rendered chats), at most ``max_chars`` per domain."""
    for path in sorted(train_dir.glob("*.jsonl")):
        used = 0
        for row in read_jsonl(path):
            if "messages" in row:
                msgs = row["messages"]
                assert isinstance(msgs, list)
                text = "\n".join(str(m["content"]) for m in msgs)
            else:
                text = str(row["text"])
            yield text[: max_chars - used]
            used += len(text)
            if used >= max_chars:
                break


def train_tokenizer(
    train_dir: Path, vocab_size: int = 4096, max_chars: int = 4_000_000
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the training split; returns the wrapped tokenizer."""
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size must be at least 300 (256 bytes + specials), got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_texts(train_dir, max_chars), trainer=trainer)
    return wrap(bpe)


def wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """The ``transformers`` tokenizer around a trained ``tokenizers`` object."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
