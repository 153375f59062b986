"""The runner's passthrough path: spans of ring records leave as RawRecords events, and once
decoded by the codec they are exactly what the per-record decoding path frames: the same
events, ProcessInfo before each process's first record, the agent's own records and untraced
processes left out, bad records counted and skipped, frames bounded in records."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.config import AgentSettings
from probe_agent.metrics import AgentMetrics
from probe_agent.probes import goroutines, http
from probe_agent.runner import AgentRunner, _RawSpan
from schemas import records as R
from schemas import weft_events_pb2 as pb
from schemas.codec import decode_frame, encode_frame

OFFSET = 1_700_000_000_000_000_000
SELF = os.getpid()
GONE = 0x3FFFFFF0  # no such process: announced as nothing
SIZES: dict[int, int] = {k: R.RECORD_SIZES[k]
                         for k in http.HTTP_KINDS | http.CONN_KINDS | goroutines.RING_KINDS}


@pytest.fixture(scope="module")
def procs() -> Iterator[tuple[int, int]]:
    """Two live processes whose /proc entries the runner reads for their ProcessInfo."""
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield sleepers[0].pid, sleepers[1].pid
    for p in sleepers:
        p.kill()
        p.wait()


def hdr(kind: int, ts: int, pid: int, version: int = R.ABI_VERSION) -> bytes:
    return R.HEADER.pack(ts, 77, pid, pid + 1, kind, version, 0)


def http_rec(ts: int, pid: int, version: int = R.ABI_VERSION) -> bytes:
    tup = R.TUPLE.pack(socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"), 80, 5555, 2, 1, 0)
    # the header's time is the request's start
    req = R.REQ.pack(ts, ts + 5, pid, pid + 1, 9, 200, 1, 0, 3, 2, 0, 0, 0, 1, 0,
                     b"GET", b"/x", b"", b"", b"", 0)
    return hdr(R.Kind.HTTP, ts, pid, version) + R.COOKIE.pack(ts) + tup + req + bytes(R.TPCTX.size)


def go_rec(ts: int, pid: int) -> bytes:
    return hdr(R.Kind.GO_SPAWN, ts, pid) + R.GO_SPAWN_BODY.pack(ts, ts + 1)


def conn_rec(ts: int, pid: int) -> bytes:
    tup = R.TUPLE.pack(bytes(16), bytes(16), 80, 5555, 2, 1, 0)
    return hdr(R.Kind.CONN_OPEN, ts, pid) + R.CONN_COUNTS.pack(ts, 0, 0) + tup


def run(recs: list[bytes], tmp_path: Path, envelope: bool, record_size: int = 0, **settings: object
        ) -> tuple[list[pb.Frame], AgentMetrics]:
    """Frames (as the stitcher decodes them) of one round that read `recs` from a ring (of
    records all `record_size` bytes long, when given)."""
    metrics = AgentMetrics("n")
    runner = AgentRunner(AgentSettings(node="n", record_envelope=envelope, **settings),  # type: ignore[arg-type]
                         sink=None, metrics=metrics, probes=[])  # type: ignore[arg-type]
    if envelope:
        blob = b"".join(R.envelope_record(r) for r in recs)
        items: list[pb.Event | _RawSpan] = [_RawSpan(blob, OFFSET, "http", SIZES, record_size)]
    else:
        items = []
        for r in recs:
            try:
                items += R.decode(r, OFFSET)
            except R.AbiError:
                metrics.decode_errors.inc()
    frames = runner._frame(runner._prepare(items), 0) + runner.framer.flush(1, OFFSET)
    return [decode_frame(encode_frame(f)) for f in frames], metrics


def events(frames: list[pb.Frame]) -> list[pb.Event]:
    out = [e for f in frames for e in f.events if e.WhichOneof("kind") != "watermark"]
    for e in out:  # read from /proc, through a clock sampled per cache: may differ by a few ns
        if e.HasField("process"):
            e.process.ClearField("start_ns")
    return out


def pids(evs: list[pb.Event]) -> list[tuple[str, int]]:
    return [(str(e.WhichOneof("kind")), getattr(e, str(e.WhichOneof("kind"))).pid) for e in evs]


def test_passthrough_frames_decode_to_what_per_record_decoding_frames(
        tmp_path: Path, procs: tuple[int, int]) -> None:
    A, B = procs
    bad = http_rec(1_050, A, version=9)
    recs = [http_rec(1_000, A), go_rec(1_010, A), http_rec(1_020, SELF), conn_rec(1_030, B),
            bad, go_rec(1_060, GONE), http_rec(1_070, A)]
    raw_frames, raw_metrics = run(recs, tmp_path, envelope=True)
    dec_frames, dec_metrics = run(recs, tmp_path, envelope=False)
    got = events(raw_frames)
    assert got == events(dec_frames)
    assert pids(got) == [
        ("process", A), ("http", A), ("goroutine_spawn", A), ("process", B), ("conn_open", B),
        ("goroutine_spawn", GONE), ("http", A)]
    assert got[0].process.ts_ns == OFFSET + 1_000
    assert {f.schema_version for f in raw_frames} == {2}
    assert {f.schema_version for f in dec_frames} == {1}
    for name in ("http", "goroutine_spawn", "conn_open", "process"):
        assert (raw_metrics.value("weft_agent_events_total", kind=name)
                == dec_metrics.value("weft_agent_events_total", kind=name)), name
    assert raw_metrics.value("weft_agent_events_total", kind="http") == 3  # the agent's counted too
    assert raw_metrics.value("weft_agent_decode_errors_total") == 1


def test_pid_filter_applies_to_passthrough_records(tmp_path: Path, procs: tuple[int, int]) -> None:
    A, B = procs
    recs = [http_rec(1_000 + i, pid) for i, pid in enumerate((A, B, A, B))]
    frames, _ = run(recs, tmp_path, envelope=True, pids=(A,))
    assert pids(events(frames)) == [("process", A), ("http", A), ("http", A)]


@pytest.mark.parametrize("max_events", [2, 4, 512])
def test_frames_stay_within_max_events_records(tmp_path: Path, procs: tuple[int, int],
                                               max_events: int) -> None:
    A = procs[0]
    recs = [go_rec(1_000 + i, A) for i in range(25)]
    frames, _ = run(recs, tmp_path, envelope=True, frame_max_events=max_events)
    assert all(len(f.events) <= max_events for f in frames)
    spawns = [e.goroutine_spawn.parent_goid for e in events(frames) if e.HasField("goroutine_spawn")]
    assert spawns == [1_000 + i for i in range(25)]
    assert [f.seq for f in frames] == list(range(len(frames)))
    for f in frames:
        times = [e.goroutine_spawn.ts_ns for e in f.events if e.HasField("goroutine_spawn")]
        if times:
            assert f.t_min_ns <= min(times) and max(times) <= f.t_max_ns


def test_same_size_spans_read_as_arrays_frame_what_the_record_walk_frames(
        tmp_path: Path, procs: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    A, B = procs
    recs = [http_rec(1_000 + 10 * i, pid) for i, pid in enumerate((A, A, B, A, GONE, B, A, A, B))]
    walked, walked_metrics = run(recs, tmp_path, envelope=True, frame_max_events=4)

    def no_walk(*_args: object) -> None:
        raise AssertionError("the record walk ran")

    monkeypatch.setattr(AgentRunner, "_prepare_raw", no_walk)
    fixed, fixed_metrics = run(recs, tmp_path, envelope=True, record_size=R.HTTP_SIZE, frame_max_events=4)
    got, want = events(fixed), events(walked)
    assert [e for e in got if e.HasField("http")] == [e for e in want if e.HasField("http")]
    processes = [e for e in got if e.HasField("process")]
    assert sorted(processes, key=str) == sorted((e for e in want if e.HasField("process")), key=str)
    for proc in processes:  # announced before the first request of its process, at its time
        first = next(i for i, e in enumerate(got) if e.HasField("http") and e.http.pid == proc.process.pid)
        assert got.index(proc) < first and proc.process.ts_ns == got[first].http.start_ns
    assert all(len(f.events) <= 4 for f in fixed)
    assert (fixed_metrics.value("weft_agent_events_total", kind="http")
            == walked_metrics.value("weft_agent_events_total", kind="http") == len(recs))


@pytest.mark.parametrize("odd", ["own", "version", "filter"])
def test_same_size_spans_fall_back_to_the_record_walk_when_records_must_be_left_out(
        tmp_path: Path, procs: tuple[int, int], odd: str) -> None:
    A, B = procs
    recs = [http_rec(1_000, A), http_rec(1_010, B), http_rec(1_020, A)]
    settings: dict[str, object] = {}
    if odd == "own":
        recs.insert(1, http_rec(1_005, SELF))
    elif odd == "version":
        recs.insert(1, http_rec(1_005, A, version=9))
    else:
        settings["pids"] = (A,)
    fixed, _ = run(recs, tmp_path, envelope=True, record_size=R.HTTP_SIZE, **settings)
    walked, _ = run(recs, tmp_path, envelope=True, **settings)
    assert events(fixed) == events(walked)
    assert SELF not in {e.http.pid for e in events(fixed) if e.HasField("http")}
