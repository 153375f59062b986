"""A full HTTP ring: each request whose record finds no room still reaches user space, as a
LostRequest through the connection ring, with its thread, connection, seq and times — what the
stitcher needs so that a lost record never turns into a wrong link. With that ring full too,
the agent reports the span of time such records were lost in (a BlindSpan)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.config import AgentSettings
from probe_agent.metrics import AgentMetrics
from probe_agent.probes.http import HttpProbe
from probe_agent.runner import AgentRunner
from probe_agent.sinks import CaptureSink
from schemas import weft_events_pb2 as pb
from schemas.codec import read_capture
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.integration.test_probe_http import in_child, keepalive_client
from tests.workloads.servers import running

pytestmark = pytest.mark.bpf

REQUESTS = 12  # 24 records: a one-page HTTP ring holds 7, the one-page connection ring ~36 markers


@pytest.fixture(scope="module")
def small_rings() -> Iterator[LoadedProbe]:
    with loaded(HttpProbe(), ring_pages=1) as lp:
        yield lp


def on_port(events: list[pb.Event], kind: str, port: int, role: int) -> list[pb.HttpRequest | pb.LostRequest]:
    out = []
    for e in events:
        if e.WhichOneof("kind") != kind:
            continue
        r = getattr(e, kind)
        if r.role == role and (r.tuple.local_port if role == pb.ROLE_SERVER else r.tuple.remote_port) == port:
            out.append(r)
    return sorted(out, key=lambda r: r.start_ns)


def both_roles(events: list[pb.Event], kind: str, port: int) -> list[pb.HttpRequest | pb.LostRequest]:
    return [r for role in (pb.ROLE_SERVER, pb.ROLE_CLIENT) for r in on_port(events, kind, port, role)]


def test_requests_lost_to_a_full_ring_arrive_as_lost_requests(
        small_rings: LoadedProbe, tmp_path: Path) -> None:
    before = small_rings.stats()
    with running("python", tmp_path) as srv:
        with small_rings.paused():
            in_child(keepalive_client, srv.host, srv.port, "/lost", REQUESTS)
        total = 2 * REQUESTS

        events = small_rings.wait_for(
            lambda es: len(both_roles(es, "http", srv.port) + both_roles(es, "lost_http", srv.port)) >= total)
    after = small_rings.stats()
    server_pid = srv.proc.pid
    for role in (pb.ROLE_SERVER, pb.ROLE_CLIENT):
        captured, lost = (on_port(events, k, srv.port, role) for k in ("http", "lost_http"))
        assert len(captured) + len(lost) == REQUESTS, role
        assert lost, "the one-page ring did not fill: the test shows nothing"
        conn = {(r.sock_cookie, r.tuple.SerializeToString()) for r in captured + lost}
        assert len(conn) == 1, "every record, captured or lost, names the one keep-alive connection"
        for r in lost:
            assert r.start_ns < r.end_ns and r.has_seq and r.tid
            if role == pb.ROLE_SERVER:
                assert r.pid == server_pid
        # the seqs, captured or lost, are those of REQUESTS distinct requests on the connection
        assert len({r.tcp_seq for r in captured + lost}) == REQUESTS
    # client and server of each request carry the same seq, whichever of them was lost
    seqs = {role: {r.tcp_seq for k in ("http", "lost_http") for r in on_port(events, k, srv.port, role)}
            for role in (pb.ROLE_SERVER, pb.ROLE_CLIENT)}
    assert seqs[pb.ROLE_SERVER] == seqs[pb.ROLE_CLIENT]
    assert after["ring_full"] - before["ring_full"] >= len(both_roles(events, "lost_http", srv.port))
    assert after["unmarked"] == before["unmarked"], "a marker found no room in the connection ring"


def small_ring_agent(tmp_path: Path) -> tuple[AgentRunner, AgentMetrics, Path]:
    """The agent itself (mapped rings, records passed through raw) with one-page rings, loaded;
    the test drives its rounds."""
    metrics = AgentMetrics("loss")
    capture = tmp_path / "loss.wcap"
    runner = AgentRunner(AgentSettings(node="loss", ring_pages=1), CaptureSink(capture, "loss", metrics),
                         metrics, probes=[HttpProbe()])
    runner.load()
    return runner, metrics, capture


def test_the_agent_passes_lost_requests_on_to_the_stitcher(tmp_path: Path) -> None:
    """The same through the agent: the connection ring passed through raw, expanded by the
    codec on the reading side."""
    runner, metrics, capture = small_ring_agent(tmp_path)
    try:
        with running("python", tmp_path) as srv:
            in_child(keepalive_client, srv.host, srv.port, "/lost", REQUESTS)  # nobody reads meanwhile
            for _ in range(3):
                runner.step()
            runner.read_kernel_counters()
    finally:
        runner.close()
    events = [e for f in read_capture(capture) for e in f.events]
    lost, captured = both_roles(events, "lost_http", srv.port), both_roles(events, "http", srv.port)
    assert lost and len(lost) + len(captured) == 2 * REQUESTS
    assert metrics.value("weft_agent_events_total", kind="lost_http") >= len(lost)


def test_records_lost_without_a_marker_are_reported_as_a_blind_span(tmp_path: Path) -> None:
    """When the connection ring is full too, a request leaves nothing: the agent reads the
    kernel's count of those every round and publishes the span of time they were lost in."""
    runner, _, capture = small_ring_agent(tmp_path)
    try:
        with running("python", tmp_path) as srv:
            for _ in range(3):   # a watermark or two go out first
                runner.step()
                time.sleep(0.25)
            runner.step()
            before = time.time_ns()
            in_child(keepalive_client, srv.host, srv.port, "/blind", 5 * REQUESTS)  # nobody reads
            after = time.time_ns()
            runner.step()
    finally:
        runner.close()
    events = [e for f in read_capture(capture) for e in f.events]
    lost, captured = both_roles(events, "lost_http", srv.port), both_roles(events, "http", srv.port)
    unmarked = 2 * 5 * REQUESTS - len(lost) - len(captured)
    assert unmarked > 0, "the connection ring did not fill: the test shows nothing"
    spans = [e.blind for e in events if e.WhichOneof("kind") == "blind"]
    assert len(spans) == 1
    (span,) = spans
    assert span.records >= unmarked
    slack = 50_000_000  # the agent's kernel→Unix clock offset against time.time_ns()
    assert span.ts_ns <= before + slack and span.until_ns >= after - slack
    # published before any watermark that passes its start
    kinds = [e.WhichOneof("kind") for e in events]
    marks = [e.watermark.ts_ns for e in events[:kinds.index("blind")] if e.WhichOneof("kind") == "watermark"]
    assert marks and all(m < span.ts_ns for m in marks)
