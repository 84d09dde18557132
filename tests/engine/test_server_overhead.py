"""The overhead measurement runs end to end (tiny model, one round) and reports both paths."""

from __future__ import annotations

import json

from engine.server import overhead


def test_overhead_command_measures_both_paths(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    args = ["--model", str(tiny_checkpoint.path), "--rounds", "1", "--max-tokens", "6"]
    assert overhead.main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for path in ("in_process", "server"):
        assert data[path]["tokens"] >= 1 and data[path]["first_token_ms"] > 0, data
    assert data["in_process"]["tokens"] == data["server"]["tokens"], "same greedy request"
    assert data["threads"] == 1 and data["device"] == "cpu"
    assert "| in-process |" in capsys.readouterr().out
