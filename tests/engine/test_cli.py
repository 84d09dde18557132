"""``python -m engine``: inspect/generate/score output keys, logits dump, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import build_parser, main
from engine.runtime import memory

TEXT = "It is a truth universally acknowledged that a single man must be in want of a wife."


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def fail(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1]


@pytest.fixture
def model(tiny_checkpoint) -> list[str]:
    return ["--model", str(tiny_checkpoint.path), "--cache-fraction", "0.5"]


def test_inspect_json_has_the_documented_keys(capsys, model, tiny_checkpoint):
    report = run_json(capsys, "inspect", *model, "--json", "--context-length", "64")
    info = report["model"]
    assert info["architecture"] == "Qwen2MoeForCausalLM"
    assert (info["num_layers"], info["experts_per_layer"], info["top_k"]) == (2, 4, 2)
    assert info["bytes_per_expert"] == 3 * 16 * 32 * 4 and info["trunk_bytes"] > 0
    estimate = report["estimate"]
    assert estimate["kv_cache_bytes"] == 64 * 64 * 4
    assert estimate["expert_cache_bytes"] == 4 * info["bytes_per_expert"]
    assert {"device_bytes", "host_expert_bytes", "device_free_bytes", "fits"} <= estimate.keys()


def reference_greedy(tiny_checkpoint, prompt: str, n: int) -> list[int]:
    ids = list(tiny_checkpoint.tokenizer(prompt)["input_ids"])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = tiny_checkpoint.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_generate_json_matches_reference_greedy(capsys, model, tiny_checkpoint):
    argv = ["generate", *model, "--prompt", "The quick", "--greedy", "--max-new-tokens", "5"]
    report = run_json(capsys, *argv, "--json")
    assert {"text", "token_ids", "stats"} <= report.keys()
    expected = reference_greedy(tiny_checkpoint, "The quick", 5)
    assert report["token_ids"] == expected[: len(report["token_ids"])]
    assert report["token_ids"], "some tokens were generated"
    stats = report["stats"]
    assert {
        "hit_rate",
        "bytes_per_token",
        "tokens_per_second",
        "per_layer",
        "misses",
    } <= stats.keys()
    assert stats["hits"] + stats["misses"] > 0
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert streamed.rstrip("\n") == report["text"], "plain mode streams the same text"


def test_generate_chat_with_system_and_stop(capsys, model):
    report = run_json(
        capsys, "generate", *model, "--prompt", "Hello", "--chat", "--system", "Be kind.",
        "--max-new-tokens", "4", "--seed", "3", "--temperature", "0.9", "--stop", "zzz", "--json",
    )  # fmt: skip
    assert report["prompt_tokens"] > 4 and len(report["token_ids"]) <= 4


def test_score_json_and_logits_dump_match_a_direct_forward(
    capsys, model, tiny_checkpoint, tmp_path
):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "logits.safetensors"
    report = run_json(
        capsys, "score", *model, "--text-file", str(text_file), "--json", "--dump-logits", str(out)
    )
    ids = tiny_checkpoint.tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        reference = tiny_checkpoint.model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
    dumped = load_file(str(out))
    assert dumped["logits"].dtype == torch.float32 and dumped["logits"].shape == reference.shape
    assert dumped["input_ids"].tolist() == ids
    torch.testing.assert_close(dumped["logits"], reference, atol=1e-6, rtol=1e-6)
    nll = torch.nn.functional.cross_entropy(reference[:-1], torch.tensor(ids[1:]))
    assert report["tokens"] == len(ids) and report["mean_nll"] == pytest.approx(
        float(nll), rel=1e-5
    )
    assert report["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert report["stats"]["tokens"] == len(ids)


def test_score_max_tokens_truncates(capsys, model, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    report = run_json(
        capsys, "score", *model, "--text-file", str(text_file), "--max-tokens", "5", "--json"
    )
    assert report["tokens"] == 5 and report["truncated"] is True


def test_missing_model_folder_is_bad_input(capsys, tmp_path):
    code, line = fail(capsys, "inspect", "--model", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in line


def test_missing_builtin_model_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(tmp_path / "absent"))
    code, line = fail(capsys, "generate", "--prompt", "hi")
    assert code == 2 and "built-in model" in line and "--model" in line


def test_memory_refusal_exits_3_unless_forced(capsys, model, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    code, line = fail(capsys, "generate", *model, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 3 and "force" in line
    assert main(["generate", *model, "--prompt", "hi", "--max-new-tokens", "2", "--force"]) == 0


def test_out_of_memory_exits_3_with_advice(capsys, model, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("engine.runtime.generation.forward", exhausted)
    code, line = fail(capsys, "generate", *model, "--prompt", "hi")
    assert code == 3 and "cache budget" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "   "], "empty"),
        (["--prompt", "hi", "--system", "x"], "chat"),
        (["--prompt", "hi", "--greedy", "--top-k", "3"], "--greedy"),
        (["--prompt", "hi", "--top-p", "1.5"], "top-p"),
        (["--prompt", "hi", "--context-length", "8"], "context length"),
        (["--prompt", "hi", "--alpha", "0.9", "--policy", "smoe"], "alpha"),
    ],
)
def test_bad_generate_input_exits_2_with_one_line(capsys, model, extra, message):
    code, line = fail(capsys, "generate", *model, *extra)
    assert code == 2 and message.lower() in line.lower()


def test_cache_below_one_layer_says_the_minimum(capsys, tiny_checkpoint):
    argv = [
        "generate",
        "--model",
        str(tiny_checkpoint.path),
        "--prompt",
        "hi",
        "--cache-gb",
        "1e-6",
    ]
    code, line = fail(capsys, *argv)
    assert code == 2 and "at least 2" in line


def test_unreadable_text_file_is_bad_input(capsys, model, tmp_path):
    code, line = fail(capsys, "score", *model, "--text-file", str(tmp_path / "none.txt"))
    assert code == 2 and "cannot read" in line


def test_help_lists_the_commands_and_shared_options():
    parser = build_parser()
    text = parser.format_help()
    assert all(name in text for name in ("inspect", "generate", "score"))
    generate_help = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--cache-fraction",
        "--policy",
        "--no-cpu-assist",
        "--repetition-penalty",
        "--stop",
    ):
        assert option in generate_help


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_cuda_without_a_gpu_is_bad_input_not_a_crash(capsys, model, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    code, line = fail(capsys, command, *model, "--device", "cuda", *extra)
    assert code == 2 and "no usable NVIDIA GPU" in line


@pytest.mark.parametrize(
    "extra",
    [
        ["--alpha", "nan"],
        ["--temperature", "inf"],
        ["--top-p", "nan"],
        ["--repetition-penalty=-inf"],
        ["--cache-gb", "inf"],
        ["--cache-fraction", "NaN"],
    ],
)
def test_non_finite_numbers_are_refused_with_a_message(capsys, tiny_checkpoint, extra):
    argv = ["generate", "--model", str(tiny_checkpoint.path), "--prompt", "hi", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "finite" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--policy", "lru", "--alpha", "0.5"], "--alpha 0.5 does nothing with --policy lru"),
        (["--policy", "lfu", "--no-prefetch"], "--no-prefetch does nothing"),
        (["--no-substitution", "--alpha", "0.2"], "--alpha 0.2 does nothing with --no-sub"),
        (["--greedy", "--seed", "3"], "--seed"),
        (["--chat-template", "t.jinja"], "without --chat"),
    ],
)
def test_options_that_would_do_nothing_are_errors(capsys, model, extra, flag):
    code, line = fail(capsys, "generate", *model, "--prompt", "hi", *extra)
    assert code == 2 and flag in line


def test_defaults_are_the_apps_and_help_shows_them():
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # type: ignore[union-attr]
    assert "(default: smoe)" in help_text and "(default: auto)" in help_text
    assert "benchmark curve" in help_text  # where --alpha's default comes from
    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert args.policy == "smoe" and args.alpha is None


def test_generate_reports_prompt_and_generated_tokens_apart(capsys, model):
    report = run_json(
        capsys, "generate", *model, "--prompt", "The quick", "--greedy", "--max-new-tokens", "3",
        "--json",
    )  # fmt: skip
    assert report["generated_tokens"] == len(report["token_ids"]) > 0
    assert report["prompt_tokens"] > 0
    assert (
        main(["generate", *model, "--prompt", "The quick", "--greedy", "--max-new-tokens", "3"])
        == 0
    )
    err = capsys.readouterr().err
    assert f"{report['prompt_tokens']} prompt tokens, {report['generated_tokens']} generated" in err
    assert "\r" not in err  # progress frames are for terminals only


def test_prompt_file_is_read_and_bounded(capsys, model, tmp_path, monkeypatch):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick", encoding="utf-8")
    argv = ["generate", *model, "--greedy", "--max-new-tokens", "2", "--json"]
    from_file = run_json(capsys, *argv, "--prompt-file", str(prompt))
    assert from_file["token_ids"] == run_json(capsys, *argv, "--prompt", "The quick")["token_ids"]
    monkeypatch.setattr("engine.cli.MAX_INPUT_BYTES", 4)
    code, line = fail(capsys, *argv, "--prompt-file", str(prompt))
    assert code == 2 and "limit" in line


def test_context_defaults_to_the_models_own_maximum(capsys, model, tiny_checkpoint):
    report = run_json(capsys, "inspect", *model, "--json")
    maximum = report["model"]["max_context"]
    assert maximum == 256 and report["estimate"]["context_length"] == maximum
    code, line = fail(capsys, "inspect", *model, "--context-length", str(maximum + 1))
    assert code == 2 and f"maximum of {maximum}" in line


def test_threads_option_sets_torch_threads(capsys, model):
    before = torch.get_num_threads()
    try:
        assert main(["inspect", *model, "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        code, line = fail(capsys, "inspect", *model, "--threads", "0")
        assert code == 2 and "--threads" in line
    finally:
        torch.set_num_threads(before)


def test_score_tokenises_no_more_text_than_the_tokens_it_keeps(
    capsys, model, tmp_path, monkeypatch
):
    from engine.runtime.prompts import MAX_CHARS_PER_TOKEN
    from engine.runtime.session import ModelSession

    seen: list[int] = []
    encode = ModelSession.encode

    def counting(self, text):  # type: ignore[no-untyped-def]
        seen.append(len(text))
        return encode(self, text)

    monkeypatch.setattr(ModelSession, "encode", counting)
    big = tmp_path / "big.txt"
    big.write_text("word " * 400_000, encoding="utf-8")
    report = run_json(
        capsys, "score", *model, "--text-file", str(big), "--max-tokens", "10", "--json"
    )
    assert report["tokens"] == 10 and report["truncated"]
    assert seen == [10 * MAX_CHARS_PER_TOKEN]
