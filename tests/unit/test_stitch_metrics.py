"""A stitcher worker's Prometheus metrics: read at scrape time from the worker's own counters,
checked here against what the worker actually wrote (the OTLP JSON lines) and the frames it was
given, and served over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from schemas import weft_events_pb2 as pb
from stitcher.app import FrameStitcher, Pending, StitchSettings, Where
from stitcher.consumer_lag import ConsumerLag
from stitcher.engine import Engine
from stitcher.metrics import StitchCollector, serve
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.sinks import JsonLinesSink
from stitcher.state_memory import BatchedMemoryStateStore
from weft.config import ConfigError


@cache
def _frames() -> tuple[tuple[pb.Frame, ...], tuple[str, ...]]:
    sim = Simulation(SimConfig(nodes=3, rps=30, seconds=1.5, seed=9))
    sim.run()
    return tuple(interleaved_frames(sim)), tuple(sim.node_names)


def _written(path: Path) -> list[dict[str, object]]:
    """Every span in an OTLP JSON lines file."""
    spans: list[dict[str, object]] = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                spans.extend(ss["spans"])
    return spans


@pytest.fixture
def worker(tmp_path: Path) -> tuple[FrameStitcher, ConsumerLag, CollectorRegistry, Path]:
    frames, nodes = _frames()
    out = tmp_path / "spans.jsonl"
    engine = Engine(BatchedMemoryStateStore())
    engine.expect_nodes(nodes)
    stitcher = FrameStitcher(engine, JsonLinesSink(out), dead_letters=None, lease=None)
    pending = [Pending(f, f.SerializeToString(), Where("raw", 0, i)) for i, f in enumerate(frames)]
    for i in range(0, len(pending), 16):
        assert stitcher.try_apply(pending[i:i + 16]) is not None
    assert stitcher.decode(b"not a frame", Where("raw", 1, 7)) is None
    stitcher.sink.force_flush()
    lag = ConsumerLag(threshold=20)
    registry = CollectorRegistry()
    registry.register(StitchCollector(stitcher, lag))
    return stitcher, lag, registry, out


def test_the_counters_agree_with_what_the_worker_wrote(worker: tuple[FrameStitcher, ConsumerLag,
                                                                     CollectorRegistry, Path]) -> None:
    _, _, registry, out = worker
    frames, _ = _frames()
    written = _written(out)
    value = registry.get_sample_value
    assert len(written) > 100
    assert value("weft_stitch_frames_total") == len(frames)
    assert value("weft_stitch_events_total") == sum(len(f.events) for f in frames)
    assert value("weft_stitch_spans_total") == len(written)
    assert value("weft_stitch_export_spans_total", {"result": "exported"}) == len(written)
    assert value("weft_stitch_export_spans_total", {"result": "failed"}) == 0
    assert value("weft_stitch_export_queue_spans") == 0
    assert value("weft_stitch_batches_total") == -(-len(frames) // 16)
    assert value("weft_stitch_engine_seconds_total") > 0
    # every span written was decided once; roots and orphans are those written without a parent
    links = {s.labels["link"]: s.value for f in registry.collect() if f.name == "weft_stitch_links"
             for s in f.samples}
    assert sum(links.values()) == len(written)
    assert links["root"] > 0
    assert links["root"] + links.get("orphan", 0) == sum(1 for s in written if not s.get("parentSpanId"))
    assert value("weft_stitch_dead_letters_total", {"reason": "undecodable frame"}) == 1


def test_the_watermark_gauges_follow_the_frames(worker: tuple[FrameStitcher, ConsumerLag,
                                                              CollectorRegistry, Path]) -> None:
    _, _, registry, _ = worker
    frames, nodes = _frames()
    newest = {node: max(e.watermark.ts_ns for f in frames if f.node == node for e in f.events
                        if e.WhichOneof("kind") == "watermark") for node in nodes}
    for node in nodes:
        assert registry.get_sample_value("weft_stitch_node_watermark_seconds",
                                         {"node": node}) == newest[node] / 1e9
    low = registry.get_sample_value("weft_stitch_low_watermark_seconds")
    assert low == min(newest.values()) / 1e9
    lag = registry.get_sample_value("weft_stitch_event_time_lag_seconds")
    assert lag is not None and abs(lag - (time.time() - min(newest.values()) / 1e9)) < 5


def test_consumer_lag_per_partition_and_revoked_partitions_leave(
        worker: tuple[FrameStitcher, ConsumerLag, CollectorRegistry, Path]) -> None:
    stitcher, lag, registry, _ = worker
    lag.observe(0, offset=10, highwater=15)
    lag.observe(3, offset=99, highwater=140)
    assert registry.get_sample_value("weft_stitch_consumer_lag_messages", {"partition": "0"}) == 4
    assert registry.get_sample_value("weft_stitch_consumer_lag_messages", {"partition": "3"}) == 40
    stitcher.engine.hold_node_timeouts = lag.behind
    assert registry.get_sample_value("weft_stitch_node_timeouts_held") == 1
    lag.forget({3})
    assert registry.get_sample_value("weft_stitch_consumer_lag_messages", {"partition": "3"}) is None
    assert not lag.behind


def test_served_over_http(worker: tuple[FrameStitcher, ConsumerLag, CollectorRegistry, Path]) -> None:
    _, _, registry, _ = worker
    port = serve(registry, 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["weft_stitch_frames"].samples[0].value == len(_frames()[0])
    assert "weft_stitch_event_time_lag_seconds" in families


def test_metrics_port_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"stitch\.metrics_port=70000"):
        StitchSettings(metrics_port=70000).validate()
