"""Trace replay: hand-made traces always; the real traces when their folder is present.

The real traces are looked up in ``$UNDERSTUDY_TRACES``, else next to the repository in
``../shared/traces``; those tests skip when neither exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.eval.traces import (
    default_policies,
    find_traces,
    load_trace,
    replay_folder,
    replay_global_pool,
    replay_layer_pools,
    replay_trace,
    sequences,
    shuffled,
    summary_markdown,
)
from engine.offload.eviction import LRUPolicy

REPO = Path(__file__).resolve().parents[2]
TRACES = Path(os.environ.get("UNDERSTUDY_TRACES", REPO.parent / "shared" / "traces"))
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no trace folder at {TRACES}")


def _write_trace(
    path: Path, experts: list[list[list[int]]], seq_id: list[int], num_experts: int
) -> Path:
    array = np.array(experts, dtype=np.int16)  # [N, L, k]
    meta = {"num_experts": num_experts, "top_k": array.shape[2], "phase": "decode"}
    np.savez(
        path,
        experts=array,
        weights=np.full(array.shape, 0.5, dtype=np.float16),
        seq_id=np.array(seq_id, dtype=np.int32),
        pos=np.array([sum(s == x for x in seq_id[:i]) for i, s in enumerate(seq_id)]),
        layer_ids=np.arange(array.shape[1], dtype=np.int16),
        meta=json.dumps(meta),
    )
    return path


def test_lru_replay_on_a_hand_made_trace(tmp_path: Path) -> None:
    # one layer, 4 experts, top-1, cache of 2: A B A C B -> hits: A(3rd); C evicts B; B misses
    path = _write_trace(tmp_path / "t_decode.npz", [[[0]], [[1]], [[0]], [[2]], [[1]]], [0] * 5, 4)
    trace = load_trace(path)
    assert replay_layer_pools(trace, LRUPolicy, fraction=0.5) == [(1, 5)]
    assert replay_global_pool(trace, LRUPolicy, fraction=0.5) == (1, 5)


def test_lost_rows_are_skipped_and_sequences_grouped(tmp_path: Path) -> None:
    rows = [[[0], [1]], [[-1], [1]], [[0], [1]]]
    trace = load_trace(_write_trace(tmp_path / "t_decode.npz", rows, [1, 0, 1], 4))
    assert [s.tolist() for s in sequences(trace)] == [[1], [0, 2]]
    hits = replay_layer_pools(trace, LRUPolicy, fraction=0.5)
    assert hits == [(1, 2), (2, 3)], "layer 0 lost one row; layer 1 reuses expert 1 twice"


def test_shuffle_keeps_rows_and_sequences(tmp_path: Path) -> None:
    rows = [[[i % 4, (i + 1) % 4]] for i in range(12)]
    trace = load_trace(_write_trace(tmp_path / "t_decode.npz", rows, [0] * 6 + [1] * 6, 4))
    control = shuffled(trace, seed=3)
    assert sorted(map(tuple, control.experts[:, 0].tolist())) == sorted(
        map(tuple, trace.experts[:, 0].tolist())
    )
    assert control.seq_id.tolist() == trace.seq_id.tolist()
    assert not np.array_equal(control.experts, trace.experts)


def test_malformed_trace_and_missing_folder_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad_decode.npz"
    np.savez(bad, experts=np.zeros((2, 1, 1)))
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(bad)
    with pytest.raises(FileNotFoundError):
        find_traces(tmp_path / "absent")


@needs_traces
def test_mixtral_lru_per_layer_matches_the_readme_and_beats_the_shuffle() -> None:
    names = [p for p in find_traces(TRACES) if p.name.startswith("mixtral")]
    assert len(names) == 4
    for fraction, (low, high) in zip(
        (0.25, 0.5, 0.75), ((0.34, 0.41), (0.57, 0.63), (0.78, 0.82)), strict=True
    ):
        real, control = [], []
        for path in names:
            trace = load_trace(path)
            real.append(np.mean([h / a for h, a in replay_layer_pools(trace, LRUPolicy, fraction)]))
            pools = replay_layer_pools(shuffled(trace), LRUPolicy, fraction)
            control.append(np.mean([h / a for h, a in pools]))
        assert all(low - 0.005 <= r <= high + 0.005 for r in real), (fraction, real)
        assert np.mean(control) < np.mean(real) - 0.01, (fraction, control, real)


@needs_traces
def test_qwen_lru_per_layer_matches_the_readme() -> None:
    trace = load_trace(TRACES / "qwen15moe_gsm8k25_decode.npz")
    assert len(sequences(trace)) == 25
    rows = replay_trace(trace, {"lru": LRUPolicy}, pools=("layer",))
    rates = [row.mean_layer_hit_rate for row in rows]
    assert rates == pytest.approx([0.31, 0.57, 0.81], abs=0.01)


@needs_traces
def test_replay_folder_rows_cover_policies_and_control() -> None:
    policies = {k: v for k, v in default_policies().items() if k != "lfu"}
    rows = replay_folder(TRACES, policies, fractions=(0.5,), pools=("layer",))
    files = find_traces(TRACES)
    assert len(rows) == len(files) * len(policies) * 2
    assert {r.policy for r in rows} == {"lru", "score-w8"}
    assert sum(r.shuffled for r in rows) == len(rows) // 2
    assert all(0.0 < r.hit_rate < 1.0 for r in rows)


def test_summary_table_pairs_real_and_shuffled(tmp_path: Path) -> None:
    rows = [[[i % 3]] for i in range(9)]
    trace = load_trace(_write_trace(tmp_path / "t_decode.npz", rows, [0] * 9, 4))
    table = summary_markdown(
        replay_trace(trace, {"lru": LRUPolicy}, (0.5,), ("layer",))
        + replay_trace(shuffled(trace), {"lru": LRUPolicy}, (0.5,), ("layer",), True)
    )
    assert table.count("\n") == 3 and "| lru |" in table and "50%" in table
