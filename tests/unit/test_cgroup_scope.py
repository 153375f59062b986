"""A --cgroup argument becomes a subtree scope: its id, its depth and its path, and which task
cgroup paths it holds (by path components, so /a never holds /ab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe_agent.enrich import CgroupScope, cgroup_scope


@pytest.mark.parametrize(("scope_path", "task_path", "held"), [
    ("/kubepods.slice", "/kubepods.slice", True),
    ("/kubepods.slice", "/kubepods.slice/pod-1/container-1", True),
    ("/kubepods.slice", "/kubepods.slice-other/pod-1", False),
    ("/kubepods.slice", "/system.slice", False),
    ("/kubepods.slice", "", False),
    ("/", "/anything/at/all", True),
])
def test_holds_by_path_components(scope_path: str, task_path: str, held: bool) -> None:
    assert CgroupScope(1, scope_path.count("/"), scope_path).holds(task_path) is held


def test_scope_of_a_directory_absolute_or_relative_to_the_mount(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    inode = (tmp_path / "a" / "b").stat().st_ino
    want = CgroupScope(inode, 2, "/a/b")
    assert cgroup_scope(tmp_path / "a" / "b", mount=tmp_path) == want
    assert cgroup_scope("/a/b", mount=tmp_path) == want
    assert cgroup_scope("a/b", mount=tmp_path) == want
    assert cgroup_scope(tmp_path, mount=tmp_path) == CgroupScope(tmp_path.stat().st_ino, 0, "/")
    with pytest.raises(OSError):
        cgroup_scope("/no-such", mount=tmp_path)
