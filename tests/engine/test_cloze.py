"""Cloze items: sentence splitting, distractors from elsewhere, determinism, grading."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.eval.cloze import (
    ClozeSettings,
    accuracy,
    build_items,
    continuation_logprob,
    pick,
    split_sentences,
)


def _text(count: int = 60) -> str:
    return " ".join(
        f"Sentence number {i} talks about topic {i % 7} at length." for i in range(count)
    )


def test_split_sentences_handles_quotes_abbreviations_and_line_breaks() -> None:
    text = 'Mr. Darcy bowed.\n"Indeed!" She smiled. It was   late? Yes.'
    assert split_sentences(text) == [
        "Mr. Darcy bowed.",
        '"Indeed!"',
        "She smiled.",
        "It was late?",
        "Yes.",
    ]


def test_items_have_true_sentence_and_three_far_distractors() -> None:
    text = _text()
    sentences = split_sentences(text)
    settings = ClozeSettings(num_items=10, context_sentences=2, min_distance=10, seed=3)
    items = build_items(text, settings)
    assert len(items) == 10
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        true_index = sentences.index(item.choices[item.answer])
        assert item.context == " ".join(sentences[true_index - 2 : true_index])
        for j, choice in enumerate(item.choices):
            if j != item.answer:
                assert abs(sentences.index(choice) - true_index) >= 10


def test_items_are_deterministic_per_seed_and_answers_vary() -> None:
    text = _text()
    first = build_items(text, ClozeSettings(num_items=12, seed=5))
    again = build_items(text, ClozeSettings(num_items=12, seed=5))
    other = build_items(text, ClozeSettings(num_items=12, seed=6))
    assert first == again
    assert first != other
    assert len({item.answer for item in first}) > 1  # the true sentence is not always first


def test_too_short_text_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError, match="too few usable sentences"):
        build_items("Only one sentence here.")
    with pytest.raises(InvalidRequestError, match="too short for a cloze"):
        build_items(_text(8), ClozeSettings(min_distance=10))


def test_continuation_logprob_sums_target_log_probs() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    value = continuation_logprob(logits, torch.tensor([0, 2]))
    assert value == pytest.approx(float(torch.log(torch.tensor(0.5 * 0.8))), rel=1e-5)
    with pytest.raises(InvalidRequestError, match="one logits row"):
        continuation_logprob(logits, torch.tensor([0]))


def test_accuracy_grades_by_highest_score() -> None:
    items = build_items(_text(), ClozeSettings(num_items=8, seed=1))
    oracle = accuracy(items, lambda item: [1.0 if j == item.answer else 0.0 for j in range(4)])
    contrarian = accuracy(items, lambda item: [0.0 if j == item.answer else 1.0 for j in range(4)])
    assert oracle == 1.0
    assert contrarian == 0.0
    assert pick([0.3, 0.9, 0.9, 0.1]) == 1
    with pytest.raises(InvalidRequestError):
        accuracy([], lambda item: [0.0])
