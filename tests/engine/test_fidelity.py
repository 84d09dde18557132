"""The fidelity harness: reference vs configurations, teacher-forced, on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.config import LiveOptions, LoadConfig
from engine.errors import InvalidRequestError
from engine.eval.cloze import ClozeSettings
from engine.eval.fidelity import (
    PlainRunner,
    RunConfig,
    format_table,
    prepare_text,
    run_fidelity,
    session_loader,
)
from engine.eval.forcing import continuation_logits, teacher_forced_logits, window_starts
from tests.helpers.tiny_models import (
    SENTENCES,
    build_tiny_moe,
    build_tiny_tokenizer,
    save_tiny_checkpoint,
)

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fidelity-tiny")
    save_tiny_checkpoint(path)
    return path


def test_identity_without_substitution_at_every_cache_size(checkpoint, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """No substitution: offloading alone must not change a single logit, whatever is cached."""
    text = prepare_text(tokenizer, TEXT, max_tokens=48, window=24, cloze_settings=CLOZE)
    loader = session_loader(LoadConfig(checkpoint, device="cpu", dtype="float32"))
    lives = [
        LiveOptions(policy="lru"),
        LiveOptions(policy="lfu"),
        LiveOptions(policy="smoe", alpha=0.0),
        LiveOptions(policy="smoe", alpha=0.4, substitution=False),
    ]
    fractions = (0.25, 0.5, 0.75, 1.0)
    configs = [RunConfig(f, live) for f in fractions for live in lives]
    rows = run_fidelity(loader, configs, text)
    for row in rows:
        label = f"{row.policy} alpha={row.alpha} cache={row.cache_fraction}"
        assert row.top1_agreement == 1.0, label
        assert row.kl == 0.0, label
        assert row.nll == row.nll_ref and row.cloze_acc == row.cloze_acc_ref, label
        assert row.substitutions_per_token == 0.0, label
    by_fraction = {row.cache_fraction: row for row in rows if row.policy == "lru"}
    assert by_fraction[0.25].bytes_per_token > by_fraction[1.0].bytes_per_token  # real offloading
    assert by_fraction[1.0].hit_rate > by_fraction[0.25].hit_rate


def test_fidelity_command_writes_one_row_per_alpha(checkpoint, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from engine.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "rows.json"
    args = [
        "fidelity",
        "--model",
        str(checkpoint),
        "--text-file",
        str(text),
        "--device",
        "cpu",
        "--policy",
        "smoe",
        "--alpha",
        "0,0.3",
        "--no-cpu-assist",
        "--cache-fraction",
        "0.25",
        "--max-tokens",
        "30",
        "--window",
        "16",
        "--cloze-items",
        "1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [row["alpha"] for row in rows] == [0.0, 0.3]
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["kl"] == 0.0  # alpha 0: exact
    assert all(row["cache_fraction"] == 0.25 and row["policy"] == "smoe" for row in rows)
    assert "top1" in capsys.readouterr().out  # the table


def test_fidelity_command_errors_are_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from engine.cli import main

    missing = ["fidelity", "--model", str(tmp_path / "nowhere"), "--text-file", str(tmp_path)]
    assert main(missing) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        main(["fidelity", "--text-file", "x", "--alpha", "0,oops"])


def test_substitution_shows_up_as_fewer_bytes_and_a_measured_deviation(
    checkpoint, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    text = prepare_text(tokenizer, TEXT, max_tokens=48, window=24)
    loader = session_loader(LoadConfig(checkpoint, device="cpu", dtype="float32"))
    plain = LiveOptions(policy="smoe", alpha=0.0, prefetch=False, cpu_assist=False)
    substituting = LiveOptions(policy="smoe", alpha=0.4, prefetch=False, cpu_assist=False)
    exact, lossy = run_fidelity(loader, [RunConfig(0.5, plain), RunConfig(0.5, substituting)], text)
    assert exact.substitutions_per_token == 0.0 and exact.kl == 0.0
    assert lossy.substitutions_per_token > 0.0
    assert lossy.bytes_per_token < exact.bytes_per_token
    assert lossy.kl > 0.0 and lossy.nll != lossy.nll_ref
    assert lossy.hit_rate > lossy.plain_hit_rate  # substitutions count as served from the cache


def test_cloze_scores_are_context_gain_over_the_reference_baseline(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from engine.eval.cloze import continuation_logprob
    from engine.eval.fidelity import run_reference

    text = prepare_text(tokenizer, TEXT, max_tokens=10, window=10, cloze_settings=CLOZE)
    reference = run_reference(PlainRunner(model), text)
    item = text.cloze_items[0]
    assert item.neutral is not None and len(reference.cloze_baseline) == len(text.cloze_items)
    choice = item.choices[item.answer]
    given_context = continuation_logprob(continuation_logits(model, item.context, choice), choice)
    given_nothing = continuation_logprob(continuation_logits(model, item.neutral, choice), choice)
    assert reference.cloze_baseline[0][item.answer] == pytest.approx(given_nothing, abs=1e-4)
    gain = reference.cloze_scores[0][item.answer]
    assert gain == pytest.approx(given_context - given_nothing, abs=1e-4)
