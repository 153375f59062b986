"""`weft agent --capture FILE` on the real kernel, end to end.

Start the agent, run a Python http.server (with OTEL_SERVICE_NAME) and curl against it, scrape the
agent's own metrics endpoint, SIGTERM the agent, then read the capture: the HTTP events of both
sides, the server's ProcessInfo (service name from its environment) before its first request,
watermarks at least every 200 ms, nothing from the agent's own traffic, and no BPF program of
the agent left in the kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.procs import free_port, port_open
from schemas import records
from schemas import weft_events_pb2 as pb
from schemas.codec import CaptureReader, read_capture
from tests.wire import plain_wire_bytes

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningAgent:
    proc: subprocess.Popen[str]
    capture: Path
    metrics_port: int
    log: Path
    prog_ids: set[int]


def agent_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs the agent holds open (from its fds' fdinfo)."""
    ids: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], check=True, capture_output=True,
                         text=True).stdout
    return {int(p["id"]) for p in json.loads(out)}


def wait_until(cond: object, timeout_s: float, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_text_fields_end_in_zeros(capture: Path) -> None:
    """Every raw HTTP record in the file holds nothing past the lengths of its text fields (the
    kernel clears a request slot before reusing it)."""
    seen = 0
    for rec in CaptureReader(capture).records():
        for event in pb.Frame.FromString(rec.payload).events:
            if not event.HasField("raw"):
                continue
            blob = records.plain_records(event.raw)
            for off, size in records.iter_envelope(blob):
                fields = records.HTTP_RECORD.unpack_from(blob, off) if size == records.HTTP_SIZE else None
                if fields is None or fields[4] != records.Kind.HTTP:
                    continue
                lengths, texts = fields[23:28], fields[30:35]  # method..tracestate
                for length, text in zip(lengths, texts, strict=True):
                    assert text[length:] == bytes(len(text) - length), (length, text)
                seen += 1
    assert seen >= 4


RESOURCE_VARIABLE = "service.namespace=shop, deployment.environment.name=ci%2Fe2e,host.name=spoofed"
RESOURCE = {"service.namespace": "shop", "deployment.environment.name": "ci/e2e"}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    capture = tmp_path / "agent.wcap"
    log = tmp_path / "agent.log"
    metrics_port = free_port()
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run")}
    with open(log, "w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from weft.cli import main; main()", "agent", "--node", "e2e",
             "--capture", str(capture), "--metrics-port", str(metrics_port)],
            cwd=ROOT, env=env, stdout=log_fh, stderr=subprocess.STDOUT, text=True)
    running = RunningAgent(proc, capture, metrics_port, log, set())
    try:
        wait_until(lambda: "weft agent e2e:" in log.read_text() or proc.poll() is not None, 60,
                   "the agent's start-up line")
        assert proc.poll() is None, log.read_text()
        running.prog_ids = agent_prog_ids(proc.pid)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_agent_captures_http_lineage_and_watermarks_and_leaves_nothing_attached(
        agent: RunningAgent, tmp_path: Path) -> None:
    assert agent.prog_ids, "the agent holds no BPF program"
    assert agent.prog_ids <= loaded_prog_ids()
    service = f"svc-{uuid.uuid4().hex[:8]}"
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello\n")
    port = free_port()
    reuse = [f"reuse-{'x' * (100 - 20 * i)}" for i in range(5)]
    for name in reuse:
        (www / name).write_text("r\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--protocol", "HTTP/1.1"],  # keep-alive
                              cwd=www, env={**os.environ, "OTEL_SERVICE_NAME": service,
                                            "OTEL_RESOURCE_ATTRIBUTES": RESOURCE_VARIABLE},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 10, "http.server")
        curls = []
        for path in ("/hello.txt?token=secret", "/missing"):
            curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"http://127.0.0.1:{port}{path}"],
                                  check=True, capture_output=True, text=True)
            curls.append(curl.stdout)
        assert curls == ["200", "404"]
        # Five requests on one keep-alive connection: the fifth reuses the first one's slot in
        # the kernel, and a long path is followed by a short one (see the zero-tail check).
        subprocess.run(["curl", "-s", "-o", "/dev/null", *(f"http://127.0.0.1:{port}/{n}" for n in reuse)],
                       check=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as r:
            metrics_text = r.read().decode()
        assert re.search(r'weft_agent_events_total\{kind="process",node="e2e"\} [1-9]', metrics_text)
        for probe in ("healthz", "readyz"):   # what a Kubernetes probe asks
            with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/{probe}", timeout=5) as r:
                assert r.status == 200
                assert re.fullmatch(r"ok: last poll round ended \d+ ms ago\n", r.read().decode())

        def http_counted() -> bool:  # counted from the records' headers, not decoded
            url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            found = re.search(r'weft_agent_events_total\{kind="http",node="e2e"\} ([\d.e+]+)', text)
            return found is not None and float(found[1]) >= 4  # (other traffic counts too)

        wait_until(http_counted, 10, "the agent to count both sides of both requests")
        assert re.search(r'weft_agent_bpf_map_fill_ratio\{map="\w+",node="e2e",probe="http"\}',
                         metrics_text)
        assert 'weft_agent_ringbuf_lost' in metrics_text
        time.sleep(0.5)  # let the requests' records reach a frame before the stop
    finally:
        server.terminate()
        server.wait()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=30) == 0, agent.log.read_text()
    log = agent.log.read_text()
    assert "Traceback" not in log, log

    # No program of ours is left in the kernel.
    wait_until(lambda: not agent.prog_ids & loaded_prog_ids(), 5,  # freed asynchronously (RCU)
               f"programs {agent.prog_ids} to leave the kernel")

    # HTTP records leave as the kernel wrote them (schema v2 raw records, LZ4 blocks): the kernel
    # already cut the query string, so it is nowhere in them, not even in unused record bytes.
    plain = b"".join(plain_wire_bytes(rec.payload) for rec in CaptureReader(agent.capture).records())
    assert b"/hello.txt" in plain and b"token=secret" not in plain   # the search sees the text
    assert any(e.raw.compression == pb.RECORDS_LZ4_BLOCK
               for rec in CaptureReader(agent.capture).records()
               for e in pb.Frame.FromString(rec.payload).events if e.HasField("raw"))
    assert_text_fields_end_in_zeros(agent.capture)
    frames = list(read_capture(agent.capture))
    assert 2 in {f.schema_version for f in frames}
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert {f.node for f in frames} == {"e2e"}
    events = [e for f in frames for e in f.events]
    agent_pid = agent.proc.pid

    # Nothing from the agent itself (it served /metrics over HTTP during the run).
    for e in events:
        kind = e.WhichOneof("kind")
        body = getattr(e, str(kind))
        assert getattr(body, "pid", None) != agent_pid, e
        assert getattr(body, "parent_pid", None) != agent_pid, e
    http = [e.http for e in events if e.WhichOneof("kind") == "http"]
    assert not [h for h in http if h.role == pb.ROLE_SERVER and h.tuple.local_port == agent.metrics_port]

    served = [h for h in http if h.role == pb.ROLE_SERVER and h.tuple.local_port == port
              and not h.path.startswith("/reuse-")]
    reused = [h.path for h in http if h.role == pb.ROLE_SERVER and h.path.startswith("/reuse-")]
    assert reused == [f"/{n}" for n in reuse]
    assert len({h.tuple.remote_port for h in http if h.role == pb.ROLE_SERVER
                and h.path.startswith("/reuse-")}) == 1  # one connection
    assert [(h.method, h.path, h.status, h.pid) for h in served] == [
        ("GET", "/hello.txt", 200, server.pid), ("GET", "/missing", 404, server.pid)]
    for h in served:
        assert h.host == f"127.0.0.1:{port}"
        assert h.end_ns >= h.start_ns > 0
        assert "secret" not in h.path
    clients = [h for h in http if h.role == pb.ROLE_CLIENT and h.tuple.remote_port == port
               and not h.path.startswith("/reuse-")]
    assert [(h.method, h.path, h.status) for h in clients] == [
        ("GET", "/hello.txt", 200), ("GET", "/missing", 404)]
    for c, s in zip(clients, served, strict=True):
        assert c.has_seq and s.has_seq and c.tcp_seq == s.tcp_seq
        assert (c.tuple.local_port, c.tuple.remote_port) == (s.tuple.remote_port, s.tuple.local_port)
        # Unix time, close to now (ktime offset applied).
        assert abs(s.start_ns - time.time_ns()) < 120 * 10**9

    # The server's ProcessInfo (service name from OTEL_SERVICE_NAME, its own resource
    # attributes) precedes its first request.
    kinds = [(e.WhichOneof("kind"), e) for e in events]
    first_http = next(i for i, (k, e) in enumerate(kinds) if k == "http" and e.http.pid == server.pid)
    infos = [e.process for k, e in kinds[:first_http] if k == "process" and e.process.pid == server.pid]
    assert infos and infos[-1].service_name == service
    assert dict(infos[-1].resource_attributes) == RESOURCE
    assert infos[-1].exe.startswith("python3")
    assert infos[-1].ppid == os.getpid()
    assert abs(infos[-1].start_ns - time.time_ns()) < 120 * 10**9

    # Watermarks: increasing, at least every 200 ms, the last one after everything.
    marks = [e.watermark.ts_ns for e in events if e.WhichOneof("kind") == "watermark"]
    assert len(marks) >= 5
    assert marks == sorted(marks)
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    assert max(gaps) <= 200 * 10**6, [g // 10**6 for g in gaps]
    assert events[-1].WhichOneof("kind") == "watermark"
    assert marks[-1] >= max(h.end_ns for h in served)

    # Rebuilt offline, the server's spans carry that resource, after Weft's own keys.
    out = tmp_path / "traces.jsonl"
    subprocess.run([sys.executable, "-c", "from weft.cli import main; main()", "rebuild",
                    str(agent.capture), "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    resources = [{a["key"]: next(iter(a["value"].values())) for a in rs["resource"]["attributes"]}
                 for line in out.read_text().splitlines() for rs in json.loads(line)["resourceSpans"]]
    assert [r for r in resources if r["service.name"] == service] == [
        {"service.name": service, "host.name": "e2e", "process.pid": str(server.pid),
         "process.executable.name": infos[-1].exe, **RESOURCE}]
