"""Process enrichment from the real /proc: exe, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
container and pod from the cgroup path, ppid, start time, cgroup id."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.enrich import (
    ProcessInfoCache,
    RuntimeCache,
    cgroup_id,
)
from tests.cgroups import private_cgroup
from tests.workloads.servers import go_binary


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    with private_cgroup("weft-enrich") as path:
        yield path


def test_a_containerised_process_brings_its_own_resource(child_cgroup: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A process in a cgroup named as containerd names a Kubernetes container, with the
    variables the OpenTelemetry Operator sets: its resource has them, its pod and its container,
    and nothing else of its environment. A malformed list is dropped and logged once."""
    pod, cid = "0f6c3a52-1b2d-4e5f-8a9b-0c1d2e3f4a5b", "9c" * 32
    container = (child_cgroup / f"kubepods-besteffort-pod{pod.replace('-', '_')}.slice"
                 / f"cri-containerd-{cid}.scope")
    container.mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "DB_PASSWORD": "hunter2",
           "OTEL_RESOURCE_ATTRIBUTES": "service.name=cart,k8s.namespace.name=shop,k8s.pod.name=cart-7d9f%2D1"}
    good = subprocess.Popen(["sleep", "30"], env=env)
    bad = subprocess.Popen(["sleep", "30"], env={**env, "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=%zz"})
    try:
        for proc in (good, bad):
            (container / "cgroup.procs").write_text(str(proc.pid))
        cache = ProcessInfoCache(max_entries=4)
        info = cache.get(good.pid)
        assert info is not None and info.service_name == "cart"
        assert dict(info.resource_attributes) == {"k8s.namespace.name": "shop", "k8s.pod.name": "cart-7d9f-1",
                                                  "k8s.pod.uid": pod, "container.id": cid}
        assert b"hunter2" not in info.SerializeToString()
        for _ in range(2):
            cache.forget(bad.pid)
            info = cache.get(bad.pid)
            assert info is not None and info.service_name == "sleep"
            assert dict(info.resource_attributes) == {"k8s.pod.uid": pod, "container.id": cid}
        warned = [r.getMessage() for r in caplog.records if "OTEL_RESOURCE_ATTRIBUTES" in r.getMessage()]
        assert warned == [f"process {bad.pid} (sleep): OTEL_RESOURCE_ATTRIBUTES ignored: the value of "
                          "k8s.pod.name has a % that starts no %XX escape"]
    finally:
        for proc in (good, bad):
            proc.kill()
            proc.wait()


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


@pytest.fixture(scope="module")
def go_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Go binary: tests/workloads/go_server.go, built with `go build`."""
    return go_binary("go_server", tmp_path_factory.mktemp("go"))


def test_a_go_binary_is_runtime_go_and_others_are_not(go_exe: Path, tmp_path: Path) -> None:
    procs = {"go": subprocess.Popen([str(go_exe), "127.0.0.1:0"]),
             "": subprocess.Popen(["sleep", "30"]),
             "python": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])}
    try:
        time.sleep(0.2)
        cache = ProcessInfoCache(max_entries=8)
        got = {name: cache.get(p.pid) for name, p in procs.items()}
        assert all(info is not None for info in got.values())
        runtimes = {name: info.runtime for name, info in got.items() if info}
        assert runtimes == {"go": "go", "": "", "python": ""}
        assert got["go"] is not None and got["go"].exe == "go_server"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    # not an ELF file at all, a missing file, a truncated ELF: never "go", never an error
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(go_exe.read_bytes()[:4096])
    runtimes = RuntimeCache()
    assert [runtimes.of(p) for p in (script, tmp_path / "missing", truncated)] == ["", "", ""]


def test_a_go_binary_without_its_build_info_is_still_go(go_exe: Path, tmp_path: Path) -> None:
    """Some release builds remove .go.buildinfo (and the build-id note) after linking; the
    function table stays, since the Go runtime needs it. Taken for a threaded program, such a
    process would get thread-based links and injected contexts: wrong for goroutines."""
    bare = tmp_path / "go_bare"
    subprocess.run(["objcopy", "--remove-section", ".go.buildinfo", "--remove-section", ".note.go.buildid",
                    str(go_exe), str(bare)], check=True)
    sections = subprocess.run(["readelf", "-S", str(bare)], check=True, capture_output=True, text=True).stdout
    assert ".go.buildinfo" not in sections and ".gopclntab" in sections
    assert RuntimeCache().of(bare) == "go"


def test_runtime_is_read_once_per_executable_and_the_cache_is_bounded(go_exe: Path, tmp_path: Path) -> None:
    runtimes = RuntimeCache(max_entries=2)
    assert [runtimes.of(go_exe) for _ in range(3)] == ["go"] * 3
    assert runtimes.reads == 1                      # one ELF parse for one (dev, inode, mtime, size)
    copy = tmp_path / "copy"
    copy.write_bytes(go_exe.read_bytes())
    assert runtimes.of(copy) == "go" and runtimes.of(sys.executable) == ""
    assert runtimes.reads == 3 and len(runtimes) == 2
    copy.write_bytes(Path("/bin/sleep").read_bytes())   # same path, new content: read again
    assert runtimes.of(copy) == "" and runtimes.reads == 4


def test_an_exiting_process_is_gone_not_misread() -> None:
    # A zombie has /proc/PID/stat but no exe and no environ: reading it would announce comm as
    # the executable and service, and no runtime. It counts as gone instead.
    proc = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        cache = ProcessInfoCache()
        assert cache.get(proc.pid) is None and cache.misses == 1
    finally:
        proc.wait()
