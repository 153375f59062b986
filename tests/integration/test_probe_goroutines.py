"""Goroutine probe on the real kernel, with real Go net/http servers (tests/workloads/go_fanout.go).

A handler that calls out from `go func(){...}()`: the events carry a GoroutineSpawn chain from
the server request's goroutine to each client request's goroutine, and the engine links each
client span to the server request it serves. With every call of two concurrent handlers on one
keep-alive connection (MaxConnsPerHost = 1, whose writeLoop goroutine was started by whichever
call dialed first), no client gets the wrong parent. A release build (`-ldflags=-s -w`) gives the
same tree. A binary whose layout cannot be read (no symbols, no function table found) is traced
without goroutine ids (goid 0) and said so; so is a request written by C code (cgo) in a Go
process.
"""

from __future__ import annotations

import os
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

from probe_agent.probes.goroutines import GoroutineProbe
from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from schemas.codec import make_frame
from stitcher.engine import Engine, Span
from stitcher.engine import events as E
from stitcher.rebuild import rebuild
from stitcher.state_memory import MemoryStateStore
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.workloads.servers import (
    GO_STRIPPED,
    GO_STRIPPED_PIE,
    ROOT,
    free_port,
    go_binary,
    running,
    unreadable_go_binary,
    wait_port,
)

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go")


@pytest.fixture(scope="module")
def probes() -> Iterator[tuple[LoadedProbe, LoadedProbe]]:
    with loaded(HttpProbe()) as http, loaded(GoroutineProbe()) as go:  # http owns the shared maps
        yield http, go


@contextmanager
def go_service(binary: Path, downstream: str, max_conns: int, go: LoadedProbe) -> Iterator[tuple[int, int]]:
    """(pid, port) of a running go_fanout, registered with the goroutine probe."""
    port = free_port()
    proc = subprocess.Popen([str(binary), f"127.0.0.1:{port}", downstream, str(max_conns)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc)
        probe = go.probe
        assert isinstance(probe, GoroutineProbe)
        assert probe.register(proc.pid)
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@contextmanager
def fan_and_leaf(workdir: Path, go: LoadedProbe, max_conns: int,
                 build_flags: tuple[str, ...] = ()) -> Iterator[tuple[int, int, int]]:
    """(fan pid, fan port, leaf pid): a go_fanout front calling a go_fanout leaf."""
    binary = go_binary("go_fanout", workdir, *build_flags)
    with go_service(binary, "unused", 0, go) as (leaf_pid, leaf_port), \
            go_service(binary, f"127.0.0.1:{leaf_port}", max_conns, go) as (fan_pid, fan_port):
        yield fan_pid, fan_port, leaf_pid


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def http_of(events: list[pb.Event], pid: int) -> dict[tuple[int, str], pb.HttpRequest]:
    return {(e.http.role, e.http.path): e.http for e in events if e.HasField("http") and e.http.pid == pid}


def spawn_parents(events: list[pb.Event], pid: int) -> dict[int, int]:
    return {e.goroutine_spawn.child_goid: e.goroutine_spawn.parent_goid for e in events
            if e.HasField("goroutine_spawn") and e.goroutine_spawn.pid == pid}


def ancestors(goid: int, parents: dict[int, int]) -> list[int]:
    chain = [goid]
    while chain[-1] in parents and len(chain) < 32:
        chain.append(parents[chain[-1]])
    return chain


def wait_requests(http: LoadedProbe, fan_pid: int, ids: list[str]) -> list[pb.Event]:
    wanted = {(pb.ROLE_SERVER, f"/fan/{i}") for i in ids} | {
        (pb.ROLE_CLIENT, f"/leaf/{i}-{k}") for i in ids for k in (0, 1)}
    return http.wait_for(lambda es: wanted <= set(http_of(es, fan_pid)))


def stitch(events: list[pb.Event], go_pids: list[int]) -> dict[tuple[int, str], Span]:
    """The engine on the captured events: {(pid, span name): span}."""
    first = min(e.http.start_ns for e in events if e.HasField("http"))
    last = max(e.http.end_ns for e in events if e.HasField("http"))
    procs = [E.process(pid, f"svc{pid}", "go_fanout", first - 10**9, runtime="go") for pid in go_pids]
    engine = Engine(MemoryStateStore())
    engine.expect_nodes({"n1": []})
    spans = engine.process(make_frame("n1", [*procs, *events, E.watermark(last + 120 * 10**9)]))
    spans += engine.flush()
    return {(s.resource.pid, s.name): s for s in spans}


def test_an_unreadable_binary_is_reported_once_and_gets_goid_zero(
        probes: tuple[LoadedProbe, LoadedProbe], workdir: Path) -> None:
    _, go = probes
    stripped = unreadable_go_binary("go_server", workdir)
    port = free_port()
    proc = subprocess.Popen([str(stripped), f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc)
        probe = go.probe
        assert isinstance(probe, GoroutineProbe)
        probe.idle()  # the start-up scan may meet other unreadable Go binaries on this machine
        before = go.stats()["go_binary_unsupported"]
        assert not probe.register(proc.pid) and not probe.register(proc.pid)
        assert go.stats()["go_binary_unsupported"] == before + 1      # said once per binary
        assert get(port, "/plain") == "ok /plain"
        http, _ = probes
        events = http.wait_for(lambda es: (pb.ROLE_SERVER, "/plain") in http_of(es, proc.pid))
        assert http_of(events, proc.pid)[(pb.ROLE_SERVER, "/plain")].goid == 0
    finally:
        proc.terminate()
        proc.wait(timeout=5)



def test_calls_from_c_code_get_no_goroutine_id(
        probes: tuple[LoadedProbe, LoadedProbe], workdir: Path) -> None:
    """cgo: C runs on the system stack, where R14 is not the calling goroutine's g. The http
    tracer believes R14 only when the user stack pointer is inside that g's stack."""
    http, go = probes
    binary = go_binary("go_cgo_client", workdir)
    with running("go", workdir) as srv:
        proc = subprocess.Popen([str(binary), str(srv.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        probe = go.probe
        assert isinstance(probe, GoroutineProbe)
        assert probe.register(proc.pid)
        out, _ = proc.communicate(b"go\n", timeout=30)
        assert out.strip() == b"done"
        wanted = {(pb.ROLE_CLIENT, "/cgo"), (pb.ROLE_CLIENT, "/go")}
        reqs = http_of(http.wait_for(lambda es: wanted <= set(http_of(es, proc.pid))), proc.pid)
    assert reqs[(pb.ROLE_CLIENT, "/cgo")].goid == 0
    assert reqs[(pb.ROLE_CLIENT, "/go")].goid == 1     # main goroutine, via the writeLoop

def assert_tree(events: list[pb.Event], fan_pid: int, leaf_pid: int, ids: list[str]) -> None:
    """Kernel facts, then the engine's tree: each client under its own server request."""
    reqs = http_of(events, fan_pid)
    parents = spawn_parents(events, fan_pid)
    for i in ids:
        server = reqs[(pb.ROLE_SERVER, f"/fan/{i}")]
        assert server.goid != 0
        for k in (0, 1):
            client = reqs[(pb.ROLE_CLIENT, f"/leaf/{i}-{k}")]
            # the client's own goroutine (not the writeLoop), spawned by the handler's
            assert ancestors(client.goid, parents)[:2] == [client.goid, server.goid], (i, k)
    assert_spans(stitch(events, [fan_pid, leaf_pid]), fan_pid, leaf_pid, ids)


def assert_spans(spans: dict[tuple[int, str], Span], fan_pid: int, leaf_pid: int, ids: list[str],
                 caller_pid: int = 0) -> None:
    """fan server <- its two clients <- their leaf servers; the fan server is a root, or the
    child of caller_pid's client when that process was traced too."""
    for i in ids:
        server = spans[(fan_pid, f"GET /fan/{i}")]
        caller = spans[(caller_pid, f"GET /fan/{i}")].span_id if caller_pid else b""
        assert server.parent_span_id == caller
        for k in (0, 1):
            client = spans[(fan_pid, f"GET /leaf/{i}-{k}")]
            assert (client.parent_span_id, client.link) == (server.span_id, "goroutine"), (i, k)
            leaf = spans[(leaf_pid, f"GET /leaf/{i}-{k}")]
            assert leaf.parent_span_id == client.span_id and leaf.trace_id == server.trace_id


@pytest.mark.parametrize("build_flags", [(), GO_STRIPPED, GO_STRIPPED_PIE], ids=["plain", "stripped", "pie"])
def test_goroutine_fanout_links_each_call_to_its_handler(
        probes: tuple[LoadedProbe, LoadedProbe], workdir: Path, build_flags: tuple[str, ...]) -> None:
    """Also for release builds (no .symtab, no DWARF): functions from the Go function table,
    g/m offsets from the runtime's type descriptors (probe_agent/goruntime_data.py), uprobes
    placed by address, which BCC turns into a file offset (also for a PIE build)."""
    http, go = probes
    skipped = go.stats()["spawn_skipped"]
    with fan_and_leaf(workdir, go, max_conns=0, build_flags=build_flags) as (fan_pid, fan_port, leaf_pid):
        ids = ["a", "b"]
        for i in ids:
            assert get(fan_port, f"/fan/{i}") == f"fan {i}"
        events = wait_requests(http, fan_pid, ids)
        events += go.snapshot()
        assert_tree(events, fan_pid, leaf_pid, ids)
        # net/http's per-request background readers (fan and leaf requests) were told apart
        # by the code address of their `go` statement, which a PIE build moves at load time
        assert go.stats()["spawn_skipped"] - skipped >= 3 * len(ids)


def test_shared_keepalive_connection_gives_no_wrong_parent(
        probes: tuple[LoadedProbe, LoadedProbe], workdir: Path) -> None:
    http, go = probes
    skipped = go.stats()["spawn_skipped"]
    with fan_and_leaf(workdir, go, max_conns=1) as (fan_pid, fan_port, leaf_pid):
        ids = ["p", "q", "r", "s"]
        concurrently(fan_port, ids)
        events = wait_requests(http, fan_pid, ids)
        events += go.snapshot()
        reqs = http_of(events, fan_pid)
        clients = [r for (role, _), r in reqs.items() if role == pb.ROLE_CLIENT]
        assert len({c.sock_cookie for c in clients}) == 1        # one connection for every call
        servers = [reqs[(pb.ROLE_SERVER, f"/fan/{i}")] for i in ids]
        assert len({s.goid for s in servers}) == len(ids)        # handlers on distinct goroutines
        # the handlers overlapped in time: a thread or pool rule could not tell them apart
        assert max(s.start_ns for s in servers) < min(s.end_ns for s in servers)
        assert_tree(events, fan_pid, leaf_pid, ids)
        assert go.stats()["caller_found"] >= 2 * len(ids)
        # Leaf side: every request came on one keep-alive connection, served by its one conn
        # goroutine, although net/http's background reader (a new goroutine per request) may
        # have read each next request's first byte: the response writer's goid is kept.
        leaf = [r for (role, _), r in http_of(events, leaf_pid).items() if role == pb.ROLE_SERVER]
        assert len(leaf) == 2 * len(ids) and len({r.sock_cookie for r in leaf}) == 1
        assert len({r.goid for r in leaf}) == 1 and leaf[0].goid != 0
        # those background readers' spawns were not reported (one per leaf request at least)
        assert go.stats()["spawn_skipped"] - skipped >= len(leaf)


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in the agent log: {log.read_text()}"
        time.sleep(0.05)


def concurrently(port: int, ids: list[str]) -> None:
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, get(port, f"/fan/{i}")))
               for i in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert answers == {i: f"fan {i}" for i in ids}


@pytest.mark.slow
def test_agent_capture_then_rebuild_gives_the_goroutine_tree(workdir: Path, tmp_path: Path) -> None:
    """The real path: `weft agent --capture` learns of the Go processes from their exec, puts
    uprobes on the binary, and `rebuild` of the capture links every call to its handler."""
    binary = go_binary("go_fanout", workdir)
    capture, log = tmp_path / "go.wcap", tmp_path / "agent.log"
    with open(log, "wb") as log_fh:
        agent = subprocess.Popen([sys.executable, "-c", "from weft.cli import main; main()", "-v", "agent",
                                  "--node", "go1", "--capture", str(capture)],
                                 cwd=ROOT, env={**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run")},
                                 stdout=log_fh, stderr=subprocess.STDOUT)
    services: list[subprocess.Popen[bytes]] = []
    try:
        wait_log(log, "weft agent go1:", agent)
        leaf_port, fan_port = free_port(), free_port()
        roles = ((leaf_port, "unused", "0"), (fan_port, f"127.0.0.1:{leaf_port}", "1"))
        for addr, downstream, conns in roles:
            services.append(subprocess.Popen([str(binary), f"127.0.0.1:{addr}", downstream, conns],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port("127.0.0.1", addr, services[-1])
        leaf_pid, fan_pid = (svc.pid for svc in services)
        for pid in (leaf_pid, fan_pid):
            wait_log(log, f"goroutine ids for pid {pid} ", agent)
        ids = ["u", "v", "w"]
        concurrently(fan_port, ids)
    finally:
        for svc in services:
            svc.terminate()
            svc.wait(timeout=5)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    spans = {(span.resource.pid, span.name): span for span in rebuild([capture]).spans}
    assert_spans(spans, fan_pid, leaf_pid, ids, caller_pid=os.getpid())   # the agent traced us too
