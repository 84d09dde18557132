"""What the app's Measure costs, counted: the app's own bench command run through the CLI.

A default Measure used to take over 20 minutes on 2 shared cores: per row it also scored
cloze items (about four times the teacher-forced pass; the reference scored them twice) and
timed chat generations, none of which the slider's curve holds. Now it is one model load and
one teacher-forced pass for the reference and for each of the four points, and nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli import main
from engine.runtime.session import ModelSession
from tests.helpers.tiny_models import SENTENCES, save_tiny_checkpoint


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every session the bench opens, each with a counter of its model's forwards."""
    opened: list[list[int]] = []
    original = ModelSession.open

    def counting_open(config: Any, *args: Any, **kwargs: Any) -> ModelSession:
        session = original(config, *args, **kwargs)
        forwards = [0]
        opened.append(forwards)

        def count(module: Any, inputs: Any) -> None:
            forwards[0] += 1

        session.loaded.model.register_forward_pre_hook(count)
        return session

    monkeypatch.setattr(ModelSession, "open", counting_open)
    return opened


def test_measure_is_five_loads_and_five_teacher_forced_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.measure import SLIDER_ALPHAS, bench_command

    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    model = tmp_path / "tiny-moe"
    save_tiny_checkpoint(model)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 4), encoding="utf-8")
    command = bench_command(model, tmp_path / "out", text)
    opened = count_sessions(monkeypatch)
    assert main([*command[3:], "--device", "cpu", "--max-tokens", "32"]) == 0  # shorter text
    err = capsys.readouterr().err
    tokens = int(re.search(r"bench: \d+ rows on (\d+) tokens", err).group(1))  # type: ignore[union-attr]
    points = len(SLIDER_ALPHAS.split(","))
    assert len(opened) == 1 + points, "one load for the reference and one per point"
    assert [f[0] for f in opened] == [tokens - 1] * (1 + points), (
        "each load runs the teacher-forced pass only (one forward per predicted token): "
        "no cloze items, no timed generations"
    )
    assert err.index("bench: reference pass done") < err.index("alpha 0:"), err
    curve = json.loads((tmp_path / "data" / "curves" / "tiny-moe.json").read_text())
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.2, 0.4, 0.6]
