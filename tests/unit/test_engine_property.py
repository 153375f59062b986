"""Property: any interleaving of the nodes' streams, with any frames delivered twice, gives
byte-identical output (the sorted spans as OTLP JSON)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import weft_events_pb2 as pb
from schemas.codec import make_frame
from stitcher.engine import Engine, Span
from stitcher.engine import events as E
from stitcher.otlp_convert import spans_to_json_line
from stitcher.simulate import SimConfig, Simulation
from stitcher.state_memory import BatchedMemoryStateStore, MemoryStateStore

NODES = 3


LOST_EVERY = 7  # every 7th request of a node reaches the engine as a LostRequest only


def _with_losses(frames: list[pb.Frame]) -> tuple[pb.Frame, ...]:
    """The node's frames with every LOST_EVERY-th request replaced by what a full ring leaves of
    it (a pb.LostRequest), so that the property covers lost requests too."""
    out, n = [], 0
    for frame in frames:
        copy = pb.Frame()
        copy.CopyFrom(frame)
        for event in copy.events:
            if event.WhichOneof("kind") != "http":
                continue
            n += 1
            if n % LOST_EVERY == 0:
                h = event.http
                event.lost_http.CopyFrom(pb.LostRequest(
                    role=h.role, start_ns=h.start_ns, end_ns=h.end_ns, pid=h.pid, tid=h.tid,
                    goid=h.goid, sock_cookie=h.sock_cookie, tuple=h.tuple, tcp_seq=h.tcp_seq,
                    has_seq=h.has_seq))
        out.append(copy)
    return tuple(out)


BLIND_FRAME = 9  # node 0 reports a BlindSpan in this frame: the 200 ms since its last watermark


def _with_blind_span(frames: tuple[pb.Frame, ...]) -> tuple[pb.Frame, ...]:
    """As the agent does: a BlindSpan from just after the previous watermark to this frame's."""
    def watermark(frame: pb.Frame) -> int:
        return max(e.watermark.ts_ns for e in frame.events if e.WhichOneof("kind") == "watermark")

    frame = frames[BLIND_FRAME]
    since, until = watermark(frames[BLIND_FRAME - 1]) + 1, watermark(frame)
    events = [*frame.events[:-1], E.blind(since, until), frame.events[-1]]   # the watermark last
    changed = make_frame(frame.node, events, agent_instance=frame.agent_instance, seq=frame.seq)
    return (*frames[:BLIND_FRAME], changed, *frames[BLIND_FRAME + 1:])


@cache
def _streams() -> tuple[tuple[pb.Frame, ...], ...]:
    # dup_rate=0: the property adds its own duplicates
    sim = Simulation(SimConfig(nodes=NODES, rps=12, seconds=1.0, seed=11, dup_rate=0.0))
    sim.run()
    streams = [_with_losses(list(sim.frames(n))) for n in range(NODES)]
    streams[0] = _with_blind_span(streams[0])
    return tuple(streams)


def _stitch(frames: list[pb.Frame], batched: bool = False, cuts: Sequence[int] = ()) -> str:
    """Stitch `frames` one per `process` call, or, given `cuts` (batch sizes, repeated as
    needed), in `process_frames` batches of those sizes."""
    engine = Engine(BatchedMemoryStateStore() if batched else MemoryStateStore())
    engine.expect_nodes({f.node for f in frames})
    spans: list[Span] = []
    if cuts:
        i, sizes = 0, itertools.cycle(cuts)
        while i < len(frames):
            size = next(sizes)
            spans += engine.process_frames(frames[i:i + size])
            i += size
    else:
        for frame in frames:
            spans += engine.process(frame)
    spans += engine.flush()
    assert len(spans) == len({s.span_id for s in spans}), "a span was emitted twice"
    return spans_to_json_line(sorted(spans, key=Span.sort_key))


@cache
def _baseline() -> str:
    return _stitch([f for stream in _streams() for f in stream])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.integers(0, NODES - 1), max_size=400),
       dups=st.sets(st.tuples(st.integers(0, NODES - 1), st.integers(0, 80)), max_size=12),
       dup_delay=st.integers(0, 5), batched=st.booleans(),
       cuts=st.lists(st.integers(1, 40), max_size=6))
def test_any_interleaving_and_duplication_gives_identical_output(
        schedule: list[int], dups: set[tuple[int, int]], dup_delay: int, batched: bool,
        cuts: list[int]) -> None:
    """…on the direct memory store and through the batched (Redis-like) path alike, frame by
    frame or cut into `process_frames` batches of any sizes."""
    streams = _streams()
    pos = [0] * NODES
    merged: list[pb.Frame] = []
    pending: list[tuple[int, pb.Frame]] = []   # redeliveries: (due at merged length, frame)

    def take(node: int) -> None:
        frame = streams[node][pos[node]]
        merged.append(frame)
        if (node, pos[node]) in dups:
            pending.append((len(merged) + dup_delay, frame))
        pos[node] += 1
        for item in [p for p in pending if p[0] <= len(merged)]:
            pending.remove(item)
            merged.append(item[1])

    for node in [*schedule, *(n for n in range(NODES) for _ in range(len(streams[n])))]:
        if pos[node] < len(streams[node]):
            take(node)
    merged.extend(frame for _, frame in pending)
    assert _stitch(merged, batched, cuts) == _baseline()


def test_baseline_is_not_trivial() -> None:
    assert _baseline().count('"spanId"') > 30
    assert '"weft.parent_lost"' in _baseline(), "no call lost its parent: the losses show nothing"
    assert '"weft.records_lost"' in _baseline(), "no link was refused in the BlindSpan"
