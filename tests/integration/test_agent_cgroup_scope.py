"""`weft agent --cgroup PATH` traces the whole subtree under PATH, including cgroups created after
the agent started (a container runtime makes one per pod or container, under a parent such as
kubepods.slice, long after the agent is up), and nothing outside it; a process already busy in
the scope while the agent starts is traced too."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from schemas import weft_events_pb2 as pb
from schemas.codec import read_capture
from tests.cgroups import private_cgroup
from tests.integration.test_probe_inject import ROOT, wait_until
from tests.workloads.servers import running

pytestmark = pytest.mark.bpf


@pytest.fixture
def scope() -> Iterator[Path]:
    """A private parent cgroup (the scope and a sibling outside it go below it)."""
    with private_cgroup("weft-scope-test") as top:
        yield top


def _hammer(url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        _get(url)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        resp.read()
        return int(resp.status)


@contextmanager
def scoped_agent(node: str, traced: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """`weft agent --cgroup traced` writing a capture, started (its start-up line seen) on entry
    and stopped on exit; yields (capture, log)."""
    capture, log = tmp_path / "agent.wcap", tmp_path / "agent.log"
    agent = subprocess.Popen([sys.executable, "-c", "from weft.cli import main; main()", "agent",
                              "--node", node, "--capture", str(capture), "--cgroup", str(traced)],
                             stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: f"weft agent {node}:" in log.read_text() or agent.poll() is not None,
                   90, "the agent's start-up line")
        assert agent.poll() is None, log.read_text()
        yield capture, log
    finally:
        agent.send_signal(signal.SIGINT)
        agent.wait(timeout=60)


def test_the_subtree_is_traced_even_where_created_later_and_nothing_outside(
        scope: Path, tmp_path: Path) -> None:
    traced = scope / "traced"
    outside = scope / "outside"
    traced.mkdir()
    outside.mkdir()
    # A server busy in the scope while the agent starts: its tasks run the programs between
    # their attach and the loader filling the roots, and must not be decided "outside" then.
    with running("python", tmp_path, cgroup=traced) as early:
        busy = threading.Event()
        warmup = threading.Thread(target=_hammer, args=(early.url("/warmup"), busy), daemon=True)
        warmup.start()
        with scoped_agent("scoped", traced, tmp_path) as (capture, log):
            busy.set()
            warmup.join(10)
            # created after the agent started: a child and a grandchild of the scope
            child = traced / "pod-1"
            grandchild = child / "container-1"
            grandchild.mkdir(parents=True)
            places = {"child": child, "grandchild": grandchild, "outside": outside}
            kinds = {"child": "python", "grandchild": "go", "outside": "python"}
            ports = {"root": early.port}
            assert [_get(early.url("/root")) for _ in range(3)] == [200, 200, 200]
            with running(kinds["child"], tmp_path, cgroup=places["child"]) as b, \
                    running(kinds["grandchild"], tmp_path, cgroup=places["grandchild"]) as c, \
                    running(kinds["outside"], tmp_path, cgroup=places["outside"]) as d:
                for name, srv in zip(places, (b, c, d), strict=True):
                    ports[name] = srv.port
                    assert [_get(srv.url(f"/{name}")) for _ in range(3)] == [200, 200, 200]
                time.sleep(1.0)   # the agent's next frames
    served = [ev.http for frame in read_capture(capture) for ev in frame.events
              if ev.WhichOneof("kind") == "http" and ev.http.role == pb.ROLE_SERVER]
    by_place = {name: [(r.method, r.path, r.status) for r in served
                       if r.tuple.local_port == port and r.path != "/warmup"]
                for name, port in ports.items()}
    assert by_place == {"root": [("GET", "/root", 200)] * 3,
                        "child": [("GET", "/child", 200)] * 3,
                        "grandchild": [("GET", "/grandchild", 200)] * 3,
                        "outside": []}, log.read_text()[-2000:]


def test_a_process_moved_into_or_out_of_the_scope_is_traced_from_then_on(scope: Path, tmp_path: Path) -> None:
    """Each task's verdict is remembered with the cgroup it was decided for: a server that a
    runtime or an operator moves (cgroup.procs) is judged again where it lands."""
    traced, outside = scope / "traced", scope / "outside"
    traced.mkdir()
    outside.mkdir()
    with scoped_agent("moved", traced, tmp_path) as (capture, log), \
            running("go", tmp_path, cgroup=outside) as srv:
        for step, place in (("before", outside), ("in", traced), ("out", outside)):
            (place / "cgroup.procs").write_text(str(srv.pid))
            assert [_get(srv.url(f"/{step}")) for _ in range(3)] == [200, 200, 200]
        time.sleep(1.0)   # the agent's next frames
    served = [ev.http.path for frame in read_capture(capture) for ev in frame.events
              if ev.WhichOneof("kind") == "http" and ev.http.role == pb.ROLE_SERVER]
    assert sorted(served) == ["/in"] * 3, log.read_text()[-2000:]
