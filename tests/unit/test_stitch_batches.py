"""FrameStitcher on batches of frames (how `weft stitch` feeds the engine): the same spans as
frame by frame, a refused frame dead-lettered without losing its batch, a store failure that
exports nothing and succeeds on the retry."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import pytest
import redis

from schemas import weft_events_pb2 as pb
from stitcher.app import FrameStitcher, Pending, Where
from stitcher.engine import Engine, Span
from stitcher.engine.store import Op
from stitcher.engine.txn import Txn
from stitcher.otlp_convert import spans_to_json_line
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.state_memory import BatchedMemoryStateStore


class ListSink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def export(self, spans: Sequence[Span]) -> None:
        self.spans.extend(spans)

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        return None


class RefusingEngine(Engine):
    """Stands for an engine bug on one input: frames of node "bad" raise inside the engine."""

    def _ingest_frame(self, txn: Txn, node: str, *args: object, **kwargs: object) -> int:
        if node == "bad":
            raise ValueError("cannot stitch this frame")
        return super()._ingest_frame(txn, node, *args, **kwargs)  # type: ignore[arg-type]


class FailingOnceStore(BatchedMemoryStateStore):
    """The memory store behind a connection that drops on the first `apply`."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 0

    def apply(self, ops: Sequence[Op]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise redis.ConnectionError("connection reset by peer")
        super().apply(ops)


@cache
def _frames() -> tuple[tuple[pb.Frame, ...], tuple[str, ...]]:
    sim = Simulation(SimConfig(nodes=3, rps=20, seconds=1.0, seed=5, dup_rate=0.0))
    sim.run()
    return tuple(interleaved_frames(sim)), tuple(sim.node_names)


def _pending(frames: Sequence[pb.Frame]) -> list[Pending]:
    return [Pending(f, f.SerializeToString(), Where("raw", 0, i)) for i, f in enumerate(frames)]


def _stitcher(engine: Engine) -> tuple[FrameStitcher, ListSink]:
    sink = ListSink()
    engine.expect_nodes(_frames()[1])
    return FrameStitcher(engine, sink, dead_letters=None, lease=None), sink


def _json(spans: list[Span], rest: list[Span]) -> str:
    return spans_to_json_line(sorted([*spans, *rest], key=Span.sort_key))


def test_batches_give_the_spans_of_frame_by_frame() -> None:
    frames, _ = _frames()
    one, one_sink = _stitcher(Engine(BatchedMemoryStateStore()))
    for p in _pending(frames):
        assert one.try_apply([p]) is not None
    many, many_sink = _stitcher(Engine(BatchedMemoryStateStore()))
    batch = _pending(frames)
    for i in range(0, len(batch), 7):
        assert many.try_apply(batch[i:i + 7]) is not None
    assert many_sink.spans, "the workload finished no span before flush"
    assert _json(many_sink.spans, many.engine.flush()) == _json(one_sink.spans, one.engine.flush())
    assert many.counters.frames == one.counters.frames == len(frames)


def test_a_refused_frame_is_dead_lettered_and_its_batch_still_stitched() -> None:
    frames, _ = _frames()
    clean, clean_sink = _stitcher(Engine(BatchedMemoryStateStore()))
    clean.try_apply(_pending(frames))
    bad = pb.Frame(node="bad", events=[pb.Event(watermark=pb.Watermark(ts_ns=1))])
    batch = _pending(frames)
    batch.insert(len(batch) // 2, Pending(bad, bad.SerializeToString(), Where("raw", 1, 99)))
    stitcher, sink = _stitcher(RefusingEngine(BatchedMemoryStateStore()))
    spans = stitcher.try_apply(batch)
    assert stitcher.counters.dead_letters == 1
    assert spans is not None and sink.spans == spans
    assert _json(sink.spans, stitcher.engine.flush()) == _json(clean_sink.spans, clean.engine.flush())


def test_a_store_failure_exports_nothing_and_the_retry_stitches_the_batch() -> None:
    frames, _ = _frames()
    store = FailingOnceStore()
    stitcher, sink = _stitcher(Engine(store))
    store.failures_left = 1
    batch = _pending(frames)
    with pytest.raises(redis.ConnectionError):
        stitcher.try_apply(batch)
    assert sink.spans == [] and stitcher.counters.frames == 0
    assert stitcher.try_apply(batch) is not None
    clean, clean_sink = _stitcher(Engine(BatchedMemoryStateStore()))
    clean.try_apply(_pending(frames))
    assert _json(sink.spans, stitcher.engine.flush()) == _json(clean_sink.spans, clean.engine.flush())
