"""The cgroup study refuses, with the reason, where no memory cgroup can be made.

Making a real group needs root and a writable ``/sys/fs/cgroup``; these tests point the study
at folders without the controller files, as on a machine without them, and at a fake v1
hierarchy, to check the limit it writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.eval import cgroup_study
from engine.eval.cgroup_study import CgroupUnavailable, MemoryGroup, enter_memory_group


def test_no_memory_controller_is_refused_with_both_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroup_study, "V1_ROOT", tmp_path / "absent-v1")
    monkeypatch.setattr(cgroup_study, "V2_ROOT", tmp_path / "absent-v2")
    with pytest.raises(CgroupUnavailable) as error:
        enter_memory_group("understudy-test")
    message = str(error.value)
    assert "cgroup v1" in message and "cgroup v2" in message, message
    assert "no cgroup v2 memory controller" in message, message


def test_a_v1_group_is_made_entered_and_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake v1 tree (plain files): the group is made next to ours and the limit written."""
    monkeypatch.setattr(cgroup_study, "V1_ROOT", tmp_path)
    monkeypatch.setattr(cgroup_study, "_current", lambda controller: "/parent")
    (tmp_path / "parent").mkdir()
    group = enter_memory_group("child")
    assert group == MemoryGroup(tmp_path / "parent" / "child", 1)
    assert (group.path / "cgroup.procs").read_text().strip().isdigit()
    assert (group.path / "memory.limit_in_bytes").read_text() == "-1", "starts unlimited"
    group.limit(123_456)
    assert (group.path / "memory.limit_in_bytes").read_text() == "123456"
    (group.path / "memory.stat").write_text("cache 4096\nrss 8192\n")
    assert group.page_cache() == 4096
