"""Header injection, form (b) (sock_ops + sk_msg), on the real kernel with the real agent.

Everything runs in a private cgroup v2 child (the agent's --cgroup), so no other process on the
machine is injected into. Servers in Python, Go and Node report the traceparent values they
received; the agent's capture says what it recorded; the join engine, with the (tuple, seq) and
(tuple, time) links switched off, must link every hop through the header alone and export
exactly the ids that went on the wire. With injection off the server's bytes hash like the
client's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from infra.procs import free_port, port_open
from schemas import weft_events_pb2 as pb
from schemas.codec import CodecError, read_capture
from stitcher.engine.config import EngineConfig
from stitcher.engine.core import Engine
from stitcher.state_memory import MemoryStateStore
from tests.cgroups import private_cgroup
from tests.integration.inject_workloads import OWN_TP, call
from weft.sampling import TraceSampler

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ROOT / "tests" / "workloads"


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cgroup() -> Iterator[Path]:
    with private_cgroup("weft-inject-test") as path:
        yield path


class Procs:
    """Processes started inside the test cgroup; all killed at the end."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self.started: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], ready: str | None = "ready") -> subprocess.Popen[str]:
        wrapped = ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
        proc = subprocess.Popen(wrapped, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.started.append(proc)
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == ready, f"{argv} did not start: {line!r}"
        return proc

    def run(self, argv: list[str]) -> list[dict[str, Any]]:
        proc = self.start(argv, ready=None)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{argv} failed"
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class Agent:
    def __init__(self, tmp: Path, cgroup: Path, inject: bool, metrics_port: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.capture = tmp / f"agent-{'on' if inject else 'off'}.wcap"
        self.log = tmp / f"agent-{'on' if inject else 'off'}.log"
        self.metrics_port = metrics_port
        argv = [sys.executable, "-c", "from weft.cli import main; main()", "agent", "--node", "inj",
                "--capture", str(self.capture), "--cgroup", str(cgroup)]
        if inject:
            argv.append("--inject-headers")
        if metrics_port:
            argv += ["--metrics-port", str(metrics_port)]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        wait_until(lambda: "weft agent inj:" in self.log.read_text() or self.proc.poll() is not None,
                   90, "the agent's start-up line")
        assert self.proc.poll() is None, self.log.read_text()

    def prog_ids(self) -> set[int]:
        """Ids of the BPF programs the agent holds (from its fds' fdinfo)."""
        ids: set[int] = set()
        for entry in Path(f"/proc/{self.proc.pid}/fdinfo").iterdir():
            try:
                text = entry.read_text()
            except OSError:
                continue
            ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("prog_id:"))
        return ids

    def kernel_counter(self, probe: str, counter: str) -> float:
        """A kernel-side counter as the agent's metrics endpoint shows it (read once a second)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as got:
            text = got.read().decode()
        for line in text.splitlines():
            if (line.startswith("weft_agent_kernel_counter_total{") and f'probe="{probe}"' in line
                    and f'counter="{counter}"' in line):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> list[pb.HttpRequest]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        return [ev.http for frame in read_capture(self.capture) for ev in frame.events
                if ev.WhichOneof("kind") == "http"]

    def frames(self) -> list[pb.Frame]:
        return list(read_capture(self.capture))


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.inject_workloads", *args]


def go_build(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    if shutil.which("go") is None:
        pytest.fail("go is not installed (Debian golang): the Go workloads cannot be built")
    out = tmp_path_factory.mktemp("go") / name
    env = {**os.environ, "GOCACHE": str(out.parent / "cache"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(out), str(WORKLOADS / f"{name}.go")], check=True, env=env,
                   cwd=out.parent, timeout=300)
    return out


@pytest.fixture(scope="module")
def go_echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_build(tmp_path_factory, "inject_echo")


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_build(tmp_path_factory, "inject_go_client")


def captured_process(capture: Path, pid: int) -> pb.ProcessInfo | None:
    """The agent's ProcessInfo for pid, if its capture holds one yet (the file is growing)."""
    try:
        for frame in read_capture(capture):
            for ev in frame.events:
                if ev.WhichOneof("kind") == "process" and ev.process.pid == pid:
                    return ev.process
    except (CodecError, FileNotFoundError):
        pass  # a record still being written: look again
    return None


def by_path(events: list[pb.HttpRequest], role: int) -> dict[str, list[pb.HttpRequest]]:
    out: dict[str, list[pb.HttpRequest]] = {}
    for h in events:
        if h.role == role:
            out.setdefault(h.path, []).append(h)
    return out


def test_injection_on(tmp_path: Path, cgroup: Path, go_echo: Path) -> None:
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=True)
    try:
        startup = agent.log.read_text()
        assert "form (b), sock_ops + sk_msg with bpf_msg_push_data, is active" in startup
        assert "form (a), bpf_probe_write_user, is refused by the kernel" in startup
        progs = agent.prog_ids()
        prog_types = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
        assert {"sock_ops", "sk_msg"} <= {line.split()[1].rstrip(":") for line in prog_types.splitlines()
                                          if line.split() and line.split()[0].rstrip(":").isdigit()
                                          and int(line.split()[0].rstrip(":")) in progs}
        ports = {name: free_port() for name in ("py", "go", "node", "nested", "down", "pooled")}
        procs.start(python("echo", str(ports["py"])))
        procs.start([str(go_echo), str(ports["go"])])
        procs.start(["node", str(WORKLOADS / "inject_echo.js"), str(ports["node"])])
        procs.start(python("echo", str(ports["down"])))
        procs.start(python("nested", str(ports["nested"]), str(ports["down"])))
        procs.start(python("pooled", str(ports["pooled"]), str(ports["down"])))
        answers = {name: procs.run(python("client", str(ports[name]))) for name in ("py", "go", "node")}
        (nested,) = procs.run(python("once", str(ports["nested"])))
        first, second = procs.run(python("twice", str(ports["pooled"])))
        wait_until(lambda: port_open("127.0.0.1", ports["py"]), 5, "servers up")
    finally:
        procs.close()
        events = agent.stop()
    assert agent.proc.returncode == 0, agent.log.read_text()

    clients = [h for h in events if h.role == pb.ROLE_CLIENT]
    injected = {h.injected_traceparent for h in clients if h.injected_traceparent}
    for name, rows in answers.items():
        for row in rows:
            if row["case"] == "own":
                assert row["tp"] == [OWN_TP], (name, row)      # never a second traceparent
                continue
            assert len(row["tp"]) == 1, (name, row)             # exactly one, also when split
            if row["case"] in ("single", "post", "bigpost", "again"):
                assert row["segs"] == 1, (name, row)            # the push did not split the send
            if row["case"] == "split":
                assert row["segs"] == 3, (name, row)            # one segment per send, line included
            assert row["tp"][0] in injected, (name, row)        # = the client event's record
            if name == "py":
                raw = row["raw"].encode("latin-1")
                line = f"traceparent: {row['tp'][0]}\r\n".encode()
                assert raw.count(line) == 1
                assert hashlib.sha256(raw.replace(line, b"", 1)).hexdigest() == row["sent_sha"]
    # the nested server's downstream calls carry the trace of the request it serves
    (incoming,) = nested["incoming"]
    outer_trace = incoming.split("-")[1]
    for key in ("same_thread", "spawned"):
        (tp,) = nested[key]["tp"]
        assert tp.split("-")[1] == outer_trace, (key, tp, incoming)
        assert tp in injected

    # a pool thread made during the first request gives that request's trace to the first call
    # only: in the second request (same server thread, same worker) the reference is stale
    first_trace = first["incoming"][0].split("-")[1]
    second_trace = second["incoming"][0].split("-")[1]
    assert first["pool"]["tp"][0].split("-")[1] == first_trace
    assert second["pool"]["tp"][0].split("-")[1] not in (first_trace, second_trace)

    servers = by_path(events, pb.ROLE_SERVER)
    for path in ("/nested", "/from-handler", "/from-thread"):
        (server,) = servers[path]
        assert server.assigned_traceparent.split("-")[1] == outer_trace
    # every client request and its server have the same TCP sequence number (pushed bytes counted)
    client_by_path = by_path(events, pb.ROLE_CLIENT)
    hops = 0
    for path in ("/single", "/split", "/post", "/bigpost", "/hugepost", "/again", "/nested",
                 "/from-handler", "/from-thread", "/pool-1", "/pool-2", "/from-pool"):
        for c in client_by_path[path]:
            (server,) = [s for s in servers[path] if s.traceparent == c.injected_traceparent]
            assert c.has_seq and server.has_seq, path
            assert c.tcp_seq == server.tcp_seq, path
            hops += 1
    # py, go, node x (single, split, post, bigpost, hugepost, again), nested, pooled
    assert hops == 3 * 6 + 3 + 4

    # the engine links every hop by the header alone and exports exactly the wire's ids
    engine = Engine(MemoryStateStore(), EngineConfig(link_by_seq=False, link_by_tuple=False))
    spans = []
    for frame in agent.frames():
        spans += engine.process(frame)
    spans += engine.flush()
    by_span = {s.span_id.hex(): s for s in spans}
    linked = 0
    for c in clients:
        if not c.injected_traceparent:
            continue
        _, trace, span, _ = c.injected_traceparent.split("-")
        exported = by_span[span]
        assert exported.trace_id.hex() == trace
        for s in (s for s in servers.get(c.path, []) if s.traceparent == c.injected_traceparent):
            _, strace, sspan, _ = s.assigned_traceparent.split("-")
            child = by_span[sspan]
            assert child.parent_span_id.hex() == span and child.link == "traceparent"
            assert child.trace_id.hex() == trace == strace
            linked += 1
    assert linked == hops
    # the nested chain is one trace: client -> /nested server -> both downstream calls -> servers
    (outer,) = servers["/nested"]
    outer_span = by_span[outer.assigned_traceparent.split("-")[2]]
    for path in ("/from-handler", "/from-thread"):
        (call_event,) = client_by_path[path]
        call_span = by_span[call_event.injected_traceparent.split("-")[2]]
        assert call_span.parent_span_id == outer_span.span_id
        assert call_span.trace_id == outer_span.trace_id
    assert engine.stats.trace_mismatch == 0
    # nothing of ours stays in the kernel: not on the cgroup, no program, no pinned map
    shown = subprocess.run(["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True)
    assert "sock_ops" not in shown.stdout, shown.stdout
    # the kernel frees programs in deferred work (tail-called ones with their program array), so
    # give it a moment after the agent's exit
    def loaded(prog: int) -> bool:
        shown = subprocess.run(["bpftool", "prog", "show", "id", str(prog)], capture_output=True)
        return shown.returncode == 0

    wait_until(lambda: not any(loaded(p) for p in progs), 10, "the agent's programs to be freed")


def test_injection_off_bytes_unchanged(tmp_path: Path, cgroup: Path) -> None:
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=False)
    try:
        port = free_port()
        procs.start(python("echo", str(port)))
        rows = procs.run(python("client", str(port)))
    finally:
        procs.close()
        events = agent.stop()
    assert len(rows) == 7
    for row in rows:
        assert row["sha"] == row["sent_sha"], row
        assert row["tp"] == ([OWN_TP] if row["case"] == "own" else [])
    assert not any(h.injected_traceparent or h.assigned_traceparent for h in events)


def test_doctor_reports_both_forms() -> None:
    out = subprocess.run([sys.executable, "-c", "from weft.cli import main; main()", "doctor"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "header injection: form (b), sock_ops + sk_msg with bpf_msg_push_data, is active" in out.stdout
    assert "header injection: form (a), bpf_probe_write_user, is refused by the kernel" in out.stdout


def test_go_client_never_injected(tmp_path: Path, cgroup: Path, go_client: Path) -> None:
    """A Go process (known to the agent) sends its requests unchanged: a thread's context is not
    a goroutine's."""
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=True)
    try:
        port = free_port()
        procs.start(python("echo", str(port)))
        client = procs.start([str(go_client), f"http://127.0.0.1:{port}/go-client"])
        wait_until(lambda: getattr(captured_process(agent.capture, client.pid), "runtime", "") == "go",
                   20, "the agent to learn the client is Go")
        out, _ = client.communicate("go\n", timeout=30)
    finally:
        procs.close()
        events = agent.stop()
    answer = json.loads(out.splitlines()[-1])
    assert answer["tp"] == []
    assert "traceparent" not in answer["raw"].lower()
    go_calls = [h for h in events if h.role == pb.ROLE_CLIENT and h.path == "/go-client"]
    assert len(go_calls) == 1 and not go_calls[0].injected_traceparent


def _get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def test_event_loop_overlap_gets_no_wrong_context(tmp_path: Path, cgroup: Path) -> None:
    """One thread reads two requests before answering either (Node's event loop): a send from it
    may belong to either, so nothing is injected (the seq link still joins the hop). The same
    server with one request open at a time injects the trace of the request it serves."""
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=True)
    try:
        down, overlap, single = free_port(), free_port(), free_port()
        procs.start(python("echo", str(down)))
        procs.start(["node", str(WORKLOADS / "inject_overlap.js"), str(overlap), str(down), "2"])
        procs.start(["node", str(WORKLOADS / "inject_overlap.js"), str(single), str(down), "1"])
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda p: _get(overlap, p), ["/overlap-1", "/overlap-2"]))
        alone = _get(single, "/alone")
    finally:
        procs.close()
        events = agent.stop()
    assert [answer["down"]["tp"] for answer in both] == [[], []]
    servers = by_path(events, pb.ROLE_SERVER)
    (alone_server,) = servers["/alone"]
    (tp,) = alone["down"]["tp"]
    assert tp.split("-")[1] == alone_server.assigned_traceparent.split("-")[1]
    # the two overlapping requests did get their own ids, for export
    assert all(servers[p][0].assigned_traceparent for p in ("/overlap-1", "/overlap-2"))


def test_fast_path_edges(tmp_path: Path, cgroup: Path) -> None:
    """The injector reads a send's head 8 bytes at a time when the whole head is in it, and hands
    anything else to its byte-wise scanner: either way, each request gets exactly one valid
    traceparent (its own, if it has one) and every other byte arrives unchanged. Cases: header
    lines at every alignment against the words read, names in mixed case and names that only
    start like the ones followed, a body that looks like a head, bodies in later sends, names and
    values split across sends, methods and lengths the fast path leaves to the scanner, heads
    ending at, one byte past and two bytes past the bytes followed, a body's end and the next
    request in one send. The agent's fast_path counter says which sends the fast path settled."""
    procs = Procs(cgroup)
    metrics_port = free_port()
    agent = Agent(tmp_path, cgroup, inject=True, metrics_port=metrics_port)
    try:
        port = free_port()
        procs.start(python("echo", str(port)))
        rows = procs.run(python("edges", str(port)))
        expected_fast = sum(row["fast"] for row in rows)
        deadline = time.monotonic() + 15
        while (fast := agent.kernel_counter("inject", "fast_path")) != expected_fast:
            assert time.monotonic() < deadline, f"fast_path {fast}, expected {expected_fast}"
            time.sleep(0.2)
    finally:
        procs.close()
        events = agent.stop()
    injected = {h.injected_traceparent for h in events if h.role == pb.ROLE_CLIENT and h.injected_traceparent}
    for row in rows:
        raw = row["raw"].encode("latin-1")
        if row["expected"] == "inject":
            (tp,) = row["tp"]
            assert tp in injected, row["case"]
            line = f"traceparent: {tp}\r\n".encode()
            assert raw.count(line) == 1, row["case"]
            rest = raw.replace(line, b"", 1)
            assert hashlib.sha256(rest).hexdigest() == row["sent_sha"], row["case"]
            # after the request line when the head came in one send, else before the blank line
            at = raw.index(line)
            if row["head_in_first"]:
                assert at == rest.index(b"\r\n") + 2, row["case"]
            else:
                assert at == rest.index(b"\r\n\r\n") + 2, row["case"]
            if row["sends"] == 1:
                assert row["segs"] == 1, row["case"]
        else:
            assert row["tp"] == ([OWN_TP] if row["expected"] == "own" else []), row["case"]
            assert row["sha"] == row["sent_sha"], row["case"]


def test_a_lost_server_record_leaves_no_context_behind(
        tmp_path: Path, cgroup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server request whose record the full ring could not take still ends its context: a call
    its thread makes afterwards, outside any request, is injected as ever, with a trace of its
    own, not the ended request's. (Before, the context outlived the request: the next request
    on the thread found it "still serving", marked the thread as an event loop, and nothing it
    sent was ever injected again.) The agent is stopped (SIGSTOP: a starved agent) with
    one-page rings, so the records of the requests before fill the ring."""
    monkeypatch.setenv("WEFT_AGENT_RING_PAGES", "1")
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=True)
    try:
        down, port = free_port(), free_port()
        procs.start(python("echo", str(down)))
        server = procs.start(python("after", str(port), str(down)))
        assert server.stdout is not None
        call_after = f"GET /call-after HTTP/1.1\r\nHost: a\r\nTraceparent: {OWN_TP}\r\n\r\n".encode()
        conn, _ = call(port, [call_after])
        room = json.loads(server.stdout.readline())   # the ring had room: the context ended
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(12):
                conn, _ = call(port, [f"GET /fill-{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode()], conn)
            conn, _ = call(port, [call_after], conn)
            full = json.loads(server.stdout.readline())
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        conn.close()
    finally:
        procs.close()
        agent.stop()
    assert len(room["tp"]) == 1 and len(full["tp"]) == 1, "the thread's call was not injected"
    own_trace = OWN_TP.split("-")[1]   # the ended request came in with it
    assert room["tp"][0].split("-")[1] != own_trace and full["tp"][0].split("-")[1] != own_trace
    events = [ev for frame in agent.frames() for ev in frame.events]
    lost = [ev.lost_http for ev in events if ev.WhichOneof("kind") == "lost_http"
            and ev.lost_http.role == pb.ROLE_SERVER and ev.lost_http.tuple.local_port == port]
    assert lost, "the ring did not fill: the test shows nothing"


# low 64 bits of the trace id: 1 is kept at ratio 0.5, 2^64 - 2 is not
KEPT, LEFT_OUT = f"{7:016x}{1:016x}", f"{7:016x}{(1 << 64) - 2:016x}"


def _flags_run(tmp_path: Path, cgroup: Path, sampler: str,
               incoming: list[tuple[str, str]]) -> tuple[str, list[list[str]]]:
    """An agent with `sampler` at ratio 0.5, injecting: at least 20 root requests from a Python
    client, each flagged by its trace id, and one request per (trace, flags) of `incoming` to a
    threaded server whose calls from its handler thread and from a thread it spawns are each
    flagged [same thread, spawned]. Every header checked equal to the one the agent recorded.
    Returns the agent's log and those flags."""
    procs = Procs(cgroup)
    agent = Agent(tmp_path, cgroup, inject=True,
                  env={"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    try:
        down, nested = free_port(), free_port()
        procs.start(python("echo", str(down)))
        procs.start(python("nested", str(nested), str(down)))
        roots = [row for _ in range(4) for row in procs.run(python("client", str(down)))
                 if row["case"] != "own"]
        served = [_nested(nested, f"00-{trace}-{1:016x}-{flags}") for trace, flags in incoming]
    finally:
        procs.close()
        events = agent.stop()
    injected = {h.injected_traceparent for h in events if h.role == pb.ROLE_CLIENT and h.injected_traceparent}
    by_id = TraceSampler(0.5)
    root_flags = []
    for row in roots:
        (tp,) = row["tp"]
        _, trace, _, flag = tp.split("-")
        assert flag == ("01" if by_id.keeps(bytes.fromhex(trace)) else "00"), tp
        assert tp in injected, tp
        root_flags.append(flag)
    assert len(root_flags) >= 20 and set(root_flags) == {"00", "01"}   # both: 2^-19 odds otherwise
    passed_on = []
    for (trace, _), answer in zip(incoming, served, strict=True):
        flags = []
        for key in ("same_thread", "spawned"):
            (tp,) = answer[key]["tp"]
            assert tp.split("-")[1] == trace and tp in injected, (key, tp)
            flags.append(tp.split("-")[3])
        passed_on.append(flags)
    return agent.log.read_text(), passed_on


def test_injected_flags_follow_the_agents_sampler(tmp_path: Path, cgroup: Path) -> None:
    """With OTEL_TRACES_SAMPLER=traceidratio at 0.5 the injector writes flags 01 for a trace the
    stitcher's sampler keeps and 00 for one it leaves out, so a downstream SDK records what Weft
    exports: for new traces (roots) and for the trace of the request a thread serves, whatever its
    caller said. The agent records the header as it went on the wire, flags included."""
    log, passed_on = _flags_run(tmp_path, cgroup, "traceidratio", [(KEPT, "00"), (LEFT_OUT, "01")])
    assert "injected traceparents say sampled for traceidratio 0.5 of traces" in log
    assert passed_on == [["01", "01"], ["00", "00"]]


def test_a_parent_based_sampler_passes_on_the_callers_flag(tmp_path: Path, cgroup: Path) -> None:
    """With parentbased_traceidratio at 0.5 a request that came with a traceparent passes its flag
    on, whatever its trace id says (the SDK's ParentBased); a new trace is decided by its id."""
    cases = [(KEPT, "00"), (LEFT_OUT, "01"), (LEFT_OUT, "03"), (KEPT, "0a")]   # flag: the last bit
    log, passed_on = _flags_run(tmp_path, cgroup, "parentbased_traceidratio", cases)
    assert ("injected traceparents pass on the caller's sampled flag (parentbased_traceidratio), sampled "
            "for 0.5 of the traces that start here") in log
    assert passed_on == [["00", "00"], ["01", "01"], ["01", "01"], ["00", "00"]]


def _nested(port: int, traceparent: str) -> dict[str, Any]:
    """What the `nested` server's calls (from its handler thread and a thread it spawns) carried
    downstream, for one request that came with this traceparent."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/nested", headers={"traceparent": traceparent})
    with urllib.request.urlopen(request, timeout=20) as answer:
        return cast(dict[str, Any], json.loads(answer.read()))
