"""The fidelity harness: reference vs configurations, teacher-forced, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import LiveOptions
from engine.errors import InvalidRequestError
from engine.eval.cloze import ClozeSettings
from engine.eval.fidelity import (
    PlainRunner,
    RunConfig,
    format_table,
    prepare_text,
    run_fidelity,
)
from engine.eval.forcing import continuation_logits, teacher_forced_logits, window_starts
from tests.helpers.tiny_models import SENTENCES, build_tiny_moe, build_tiny_tokenizer

TEXT = " ".join(SENTENCES * 3)
CLOZE = ClozeSettings(num_items=1, max_words=9, min_distance=3, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny models run ~10x faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):  # type: ignore[no-untyped-def]
    return build_tiny_moe(tokenizer)


def test_window_starts_cover_every_target_once() -> None:
    assert window_starts(10, 4) == [0, 3, 6]  # targets 1-3, 4-6, 7-9
    with pytest.raises(InvalidRequestError, match="at least 2"):
        window_starts(10, 1)


def test_token_by_token_decode_matches_one_full_forward(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor(tokenizer(SENTENCES[1], add_special_tokens=False)["input_ids"])
    logits, targets = teacher_forced_logits(model, ids, window=len(ids))
    with torch.inference_mode():
        full = model(input_ids=ids.view(1, -1)).logits[0, :-1].float()
    assert torch.equal(targets, ids[1:])
    assert torch.allclose(logits, full, atol=1e-4)
    cont = continuation_logits(model, ids[:4], ids[4:])
    assert torch.allclose(cont, full[3:], atol=1e-4)


def _loader(model, changed):  # type: ignore[no-untyped-def]
    return lambda config: PlainRunner(changed if config.live.alpha > 0 else model)


def test_same_model_reports_identity_and_a_changed_model_does_not(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.experts.down_proj.mul_(3.0)
    text = prepare_text(tokenizer, TEXT, max_tokens=40, window=24, cloze_settings=CLOZE)
    configs = [
        RunConfig(0.5, LiveOptions(policy="lru")),
        RunConfig(0.5, LiveOptions(policy="smoe", alpha=0.3), "smoe"),
    ]
    same, other = run_fidelity(_loader(model, changed), configs, text)
    assert same.top1_agreement == 1.0 and same.kl == 0.0
    assert same.ppl == same.ppl_ref and same.ppl_delta == 0.0
    assert same.cloze_acc == same.cloze_acc_ref and same.cloze_items == len(text.cloze_items)
    assert same.positions == 39
    assert other.kl > 0.0 and other.nll != other.nll_ref
    assert other.policy == "smoe" and other.alpha == 0.3 and other.substitution
    assert same.time_per_token_s > 0 and same.tokens_per_second > 0
    table = format_table([same, other])
    assert "top1" in table and "1.0000" in table and len(table.splitlines()) == 3


def test_rows_serialise_with_the_required_keys(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = prepare_text(tokenizer, TEXT, max_tokens=20, window=10)
    (row,) = run_fidelity(_loader(model, model), [RunConfig(1.0, LiveOptions())], text)
    data = row.to_dict()
    required = {
        "policy",
        "alpha",
        "cache_fraction",
        "top1_agreement",
        "kl",
        "nll",
        "ppl",
        "ppl_ref",
        "cloze_acc",
        "hit_rate",
        "bytes_per_token",
        "substitutions_per_token",
    }
    assert required <= data.keys()
    assert data["cloze_acc"] is None  # no cloze asked for


def test_bad_inputs_are_clear_errors(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="empty"):
        prepare_text(tokenizer, "   ")
    with pytest.raises(InvalidRequestError, match="too short"):
        prepare_text(tokenizer, "Hi", max_tokens=1)
    text = prepare_text(tokenizer, TEXT, max_tokens=20, window=10)
    with pytest.raises(InvalidRequestError, match="no configuration"):
        run_fidelity(_loader(model, model), [], text)
