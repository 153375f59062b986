"""Process enrichment from the real /proc: exe, OTEL_SERVICE_NAME, ppid, start time, cgroup id."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.enrich import ProcessInfoCache, cgroup2_mount, cgroup_id, service_name_from_environ


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    path = cgroup2_mount() / f"weft-enrich-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def test_service_name_only_from_its_own_variable() -> None:
    env = b"PATH=/bin\0MY_OTEL_SERVICE_NAME=no\0OTEL_SERVICE_NAME=checkout\0SECRET=x\0"
    assert service_name_from_environ(env) == "checkout"
    assert service_name_from_environ(b"PATH=/bin\0") == ""


def test_process_info_of_a_real_process_in_its_own_cgroup(child_cgroup: Path) -> None:
    before = time.time_ns()
    proc = subprocess.Popen(
        ["sleep", "30"], env={"OTEL_SERVICE_NAME": "billing", "PATH": os.environ["PATH"]})
    try:
        (child_cgroup / "cgroup.procs").write_text(str(proc.pid))
        cache = ProcessInfoCache(max_entries=4)
        info = cache.get(proc.pid)
        assert info is not None
        assert (info.pid, info.ppid, info.exe, info.service_name) == (proc.pid, os.getpid(), "sleep",
                                                                      "billing")
        assert info.cgroup_id == child_cgroup.stat().st_ino == cgroup_id(child_cgroup.name)
        # /proc start time has clock-tick resolution (10 ms here).
        assert before - 50_000_000 <= info.start_ns <= time.time_ns()
        assert cache.get(proc.pid) is info          # cached
    finally:
        proc.kill()
        proc.wait()
    cache.forget(proc.pid)
    assert cache.get(proc.pid) is None and cache.misses == 1


def test_without_the_variable_the_service_is_the_executable() -> None:
    info = ProcessInfoCache().get(os.getpid())
    assert info is not None
    assert info.exe == Path(os.readlink("/proc/self/exe")).name
    assert info.service_name == os.environ.get("OTEL_SERVICE_NAME", info.exe)


def test_cache_is_bounded() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(6)]
    try:
        cache = ProcessInfoCache(max_entries=4)
        for p in procs:
            assert cache.get(p.pid) is not None
        assert len(cache) == 4
    finally:
        for p in procs:
            p.kill()
            p.wait()
