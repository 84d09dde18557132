"""The method-decision studies run end to end on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.eval import method_study
from tests.helpers.moe_families import save_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("study") / "qwen2_moe"
    save_family("qwen2_moe", directory, seed=5)
    return directory


def _ids() -> torch.Tensor:
    return torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(0))


def test_weight_mode_rows(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(method_study, "WINDOW", 20)
    rows = method_study.weight_mode_rows(tiny, _ids(), alphas=(0.5,))
    assert [r.name for r in rows] == ["alpha 0.5 own", "alpha 0.5 own_renorm", "alpha 0.5 replaced"]
    assert all(r.substitutions_per_token > 0 for r in rows)
    assert all(0.0 <= r.top1 <= 1.0 and r.kl >= 0.0 for r in rows)
    assert "| alpha 0.5 own |" in method_study.markdown(rows)


def test_eviction_and_full_method_rows(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(method_study, "WINDOW", 20)
    rows = method_study.eviction_rows(tiny, _ids(), windows=(4,))
    assert [r.name for r in rows][:2] == ["lru", "lfu"]
    assert all(r.top1 == 1.0 and r.kl == pytest.approx(0.0, abs=1e-9) for r in rows), (
        "eviction alone must not change the output"
    )
    full = method_study.full_method_rows(tiny, _ids(), alpha=0.3)
    assert [r.name for r in full] == ["lru", "score", "+substitution", "+prefetch", "+cpu"]
    assert full[0].top1 == 1.0 and full[3].prefetch_precision > 0.0


def test_prefetch_rows_cap_the_copies(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(method_study, "WINDOW", 20)
    rows = method_study.prefetch_rows(tiny, _ids(), alpha=0.0, limits=(None, 1))
    assert [r.name for r in rows] == ["prefetch limit none", "prefetch limit 1"]
    assert all(r.top1 == 1.0 for r in rows), "prefetch alone must not change the output"
