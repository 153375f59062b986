"""Framer: batching bounds, watermark cadence, time range, sequence numbers, agent instance."""

from __future__ import annotations

import itertools

from probe_agent.framer import Framer
from schemas import weft_events_pb2 as pb
from schemas.codec import decode_frame, encode_frame

MS = 1_000_000
T0 = 5_000 * MS          # monotonic "now" at start
UNIX0 = 1_700_000_000 * 1_000_000_000


def http(start_ns: int, pid: int = 7) -> pb.Event:
    return pb.Event(http=pb.HttpRequest(start_ns=start_ns, end_ns=start_ns + 10, pid=pid, method="GET"))


def kinds(frame: pb.Frame) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in frame.events]


def test_frame_closes_at_max_events_and_keeps_order() -> None:
    framer = Framer("n1", max_events=4, max_delay_ms=1000, agent_instance=42)
    frames = framer.add([http(UNIX0 + i) for i in range(10)], T0)
    assert [len(f.events) for f in frames] == [4, 4]
    assert framer.pending == 2
    starts = [e.http.start_ns - UNIX0 for f in frames for e in f.events]
    assert starts == list(range(8))
    assert [f.seq for f in frames] == [0, 1]
    assert {f.agent_instance for f in frames} == {42}
    assert {f.node for f in frames} == {"n1"}
    assert (frames[1].t_min_ns, frames[1].t_max_ns) == (UNIX0 + 4, UNIX0 + 7)


def test_frame_closes_after_max_delay_measured_from_its_oldest_event() -> None:
    framer = Framer("n1", max_events=100, max_delay_ms=50, watermark_interval_ms=200)
    assert framer.tick(T0, UNIX0) == []
    framer.add([http(UNIX0 + 3)], T0 + 10 * MS)
    framer.add([http(UNIX0 + 1)], T0 + 40 * MS)
    assert framer.tick(T0 + 59 * MS, UNIX0) == []
    (frame,) = framer.tick(T0 + 60 * MS, UNIX0)
    assert kinds(frame) == ["http", "http"]
    assert (frame.t_min_ns, frame.t_max_ns) == (UNIX0 + 1, UNIX0 + 3)
    assert framer.tick(T0 + 150 * MS, UNIX0) == []  # nothing pending, watermark not yet due


def test_watermark_at_least_every_interval_even_when_idle() -> None:
    framer = Framer("n1", max_events=100, max_delay_ms=100, watermark_interval_ms=200)
    framer.tick(T0, UNIX0)
    marks: list[tuple[int, int]] = []
    for step in range(1, 101):              # 1 s in 10 ms steps, no events at all
        now = T0 + step * 10 * MS
        for frame in framer.tick(now, UNIX0 + now):
            assert kinds(frame) == ["watermark"]
            marks.append((now, frame.events[0].watermark.ts_ns))
    times = [T0] + [now for now, _ in marks]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 200 * MS
    assert len(marks) == 5
    assert [ts for _, ts in marks] == [UNIX0 + now for now, _ in marks]


def test_watermark_closes_the_frame_after_pending_events_and_never_goes_back() -> None:
    framer = Framer("n1", max_events=100, max_delay_ms=1000, watermark_interval_ms=200)
    framer.tick(T0, UNIX0)
    framer.add([http(UNIX0 + 5), http(UNIX0 + 6)], T0 + MS)
    (frame,) = framer.tick(T0 + 200 * MS, UNIX0 + 900)
    assert kinds(frame) == ["http", "http", "watermark"]
    assert frame.events[-1].watermark.ts_ns == UNIX0 + 900
    assert (frame.t_min_ns, frame.t_max_ns) == (UNIX0 + 5, UNIX0 + 900)
    # The clock offset was re-sampled and moved back: the watermark holds.
    (frame,) = framer.tick(T0 + 400 * MS, UNIX0 + 800)
    assert frame.events[-1].watermark.ts_ns == UNIX0 + 900


def test_watermark_never_overfills_a_frame() -> None:
    framer = Framer("n1", max_events=3, max_delay_ms=1000, watermark_interval_ms=200)
    framer.tick(T0, UNIX0)
    framer.add([http(UNIX0 + 1), http(UNIX0 + 2)], T0)
    framer.add([http(UNIX0 + 3)], T0)  # fills and closes frame 0
    framer.add([http(UNIX0 + 4), http(UNIX0 + 5)], T0)
    frames = framer.flush(T0 + MS, UNIX0 + 10)
    assert [kinds(f) for f in frames] == [["http", "http", "watermark"]]
    assert max(len(f.events) for f in frames) <= 3


def test_sequence_numbers_are_consecutive_per_instance_and_frames_round_trip() -> None:
    a = Framer("n1", max_events=2, max_delay_ms=1)
    b = Framer("n1", max_events=2, max_delay_ms=1)
    assert a.agent_instance != b.agent_instance
    frames = a.add([http(UNIX0 + i) for i in range(6)], T0)
    frames += a.flush(T0 + 1, UNIX0 + 99)
    assert [f.seq for f in frames] == list(range(len(frames)))
    for frame in frames:
        assert decode_frame(encode_frame(frame)) == frame


def raw(count: int) -> pb.Event:
    e = pb.Event()
    e.raw.abi_version, e.raw.count = 1, count
    return e


def test_raw_records_weigh_their_count_make_a_v2_frame_and_give_their_time_range() -> None:
    framer = Framer("n1", max_events=10, max_delay_ms=1000)
    assert framer.add([http(UNIX0 + 50), raw(6)], T0, [UNIX0 + 50, UNIX0 + 10],
                      t_max=[UNIX0 + 50, UNIX0 + 90], weights=[1, 6]) == []
    frames = framer.add([raw(5)], T0, [UNIX0 + 100], t_max=[UNIX0 + 120], weights=[5])
    # 1 + 6 + 5 > 10: the full frame is the first two events; the last waits
    assert [kinds(f) for f in frames] == [["http", "raw"]]
    assert frames[0].schema_version == 2
    assert (frames[0].t_min_ns, frames[0].t_max_ns) == (UNIX0 + 10, UNIX0 + 90)
    assert framer.pending == 1
    (last,) = framer.flush(T0 + 5 * MS, UNIX0 + 200)
    assert kinds(last) == ["raw", "watermark"] and last.schema_version == 2
    assert (last.t_min_ns, last.t_max_ns) == (UNIX0 + 100, UNIX0 + 200)
    assert framer.events_framed == 13  # records, not envelope events
    (plain,) = framer.add([http(UNIX0 + i) for i in range(10)], T0)
    assert plain.schema_version == 1  # no raw records: still a v1 frame
