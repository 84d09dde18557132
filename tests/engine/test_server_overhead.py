"""The overhead and waves commands run end to end on the tiny model and report what they claim."""

from __future__ import annotations

import json

from engine.server import overhead, waves


def test_overhead_command_times_both_ends_of_the_same_generation(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    args = ["--model", str(tiny_checkpoint.path), "--rounds", "2", "--max-tokens", "6"]
    assert overhead.main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["traces"]) == 2
    for trace in data["traces"]:
        engine_side, client_side = trace["server_engine"], trace["server_client"]
        assert len(engine_side["stamps"]) == len(client_side["stamps"]) >= 1, trace
        assert client_side["asked"] < engine_side["asked"] < engine_side["stamps"][0], trace
        assert all(
            c >= e for e, c in zip(engine_side["stamps"], client_side["stamps"], strict=True)
        ), "a token reaches the client after it leaves the engine (one clock)"
        assert trace["in_process"]["tokens"] == client_side["tokens"], "same greedy request"
    delivery = data["delivery"]
    assert delivery["first_token_delta_ms"]["n"] == 2 and delivery["lag_max_ms"]["min"] >= 0
    assert data["side_by_side"]["engine_speed_ratio"]["median"] > 0
    cpu = data["cpu"]
    assert cpu["server_thread_per_token_ms"]["min"] > 0, "the server's thread did some work"
    assert cpu["engine_thread_per_token_ms"]["min"] > 0, "the engine thread did the decoding"
    assert 0 < cpu["server_thread_share_of_token"]["median"] < 10, cpu
    assert data["threads"] == 1 and data["device"] == "cpu" and "load_before" in data
    assert "first token at client - at engine (ms)" in capsys.readouterr().out


def test_waves_command_reports_the_footprint_after_each_wave(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "waves.json"
    args = ["--model", str(tiny_checkpoint.path), "--clients", "3", "--waves", "2"]
    assert waves.main([*args, "--max-tokens", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["waves"]
    assert [row["wave"] for row in rows] == [0, 1, 2]
    assert [row["completed"] for row in rows] == [0, 3, 3]
    for row in rows:
        assert row["generations"] == 0 and row["connections"] == 0 and row["running"] == 0
        assert row["python_blocks"] > 0 and row["rss_bytes"] > 0, row
    assert "| wave | clients completed |" in capsys.readouterr().out


def test_bad_arguments_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        overhead.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        waves.parse_args(["--clients", "0"])
    assert "must be at least 1" in capsys.readouterr().err
