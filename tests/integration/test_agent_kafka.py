"""KafkaSink against the real broker: order per node, keys, a broker outage (SIGSTOP), and
compressed batches that Faust's client reads."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as AioPartition
from confluent_kafka import Consumer, TopicPartition

from infra.broker import create_topics, start_broker
from infra.procs import free_port, stop_daemon
from probe_agent.framer import Framer
from probe_agent.metrics import AgentMetrics
from probe_agent.sinks import KafkaSink
from probe_agent.spool import Spool
from schemas import weft_events_pb2 as pb
from schemas.codec import decode_frame
from weft.config import KafkaSettings

pytestmark = [pytest.mark.infra]

MS = 1_000_000


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, poll: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        poll()
        time.sleep(0.01)


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions]
        consumer.assign(parts)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out.append(msg)
        time.sleep(0.3)  # anything beyond `expected` (duplicates) still arriving
        for msg in consumer.consume(10_000, timeout=0.5):
            if msg.error() is None:
                out.append(msg)
        return out
    finally:
        consumer.close()


def frames_of(framer: Framer, n_events: int, start: int) -> list[pb.Frame]:
    events = [pb.Event(http=pb.HttpRequest(start_ns=10**18 + start + i, pid=1, method="GET"))
              for i in range(n_events)]
    return framer.add(events, 0)


def make_sink(settings: KafkaSettings, node: str, spool_dir: Path, **kw: Any) -> KafkaSink:
    return KafkaSink(settings, node, Spool(spool_dir), AgentMetrics(node), **kw)


def test_frames_arrive_in_order_keyed_by_node(infra: Any, tmp_path: Path) -> None:
    topic = f"agent-order-{uuid.uuid4().hex[:8]}"
    infra.create_topic(topic, 4)
    settings = dataclasses.replace(infra.kafka_settings(), raw_topic=topic)
    sent: dict[str, list[int]] = {}
    for node in ("node-a", "node-b", "node-c"):
        sink = make_sink(settings, node, tmp_path / node)
        framer = Framer(node, max_events=10)
        frames = frames_of(framer, 1500, 0)
        for frame in frames:
            sink.send(frame)
        sink.close(timeout_s=20)
        sent[node] = [f.seq for f in frames]
        assert sink.in_flight == 0 and not sink.spooling
    messages = consume_all(infra.bootstrap, topic, sum(len(v) for v in sent.values()))
    got: dict[str, list[int]] = {}
    partitions: dict[str, set[int]] = {}
    for msg in messages:
        frame = decode_frame(msg.value())
        assert msg.key() == frame.node.encode()
        got.setdefault(frame.node, []).append(frame.seq)
        partitions.setdefault(frame.node, set()).add(msg.partition())
    assert got == sent
    assert all(len(p) == 1 for p in partitions.values())


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A broker this test alone starts, freezes and stops."""
    port = free_port()
    daemon = start_broker(tmp_path / "run", port)
    try:
        yield f"127.0.0.1:{port}", daemon.pid
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        stop_daemon(daemon)


@pytest.mark.slow
def test_broker_frozen_then_back_spool_drains_with_no_loss_in_order(
        own_broker: tuple[str, int], tmp_path: Path) -> None:
    bootstrap, broker_pid = own_broker
    topic = "agent-outage"
    create_topics(bootstrap, {topic: 2})
    settings = dataclasses.replace(KafkaSettings(), bootstrap=bootstrap, raw_topic=topic)
    metrics = AgentMetrics("n1")
    spool = Spool(tmp_path / "spool", segment_bytes=64 << 10)
    sink = KafkaSink(settings, "n1", spool, metrics, max_in_flight=64, stall_after_ms=1000)
    framer = Framer("n1", max_events=20)
    produced = 0

    def load(seconds: float) -> None:   # ~400 frames/s, 8000 events/s
        nonlocal produced
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for frame in frames_of(framer, 50, produced * 20):
                sink.send(frame)
                produced += 1
            sink.poll()
            time.sleep(0.005)

    load(1.0)
    assert not sink.spooling
    os.kill(broker_pid, signal.SIGSTOP)
    load(3.0)
    assert sink.spooling
    frozen_spool = spool.frames
    assert frozen_spool > 300 and metrics.value("weft_agent_spool_frames") == frozen_spool
    os.kill(broker_pid, signal.SIGCONT)
    load(1.0)
    wait_for(lambda: spool.empty and sink.in_flight == 0 and not sink.spooling, 30,
             "the spool to drain", sink.poll)
    sink.close(timeout_s=10)
    assert metrics.value("weft_agent_dropped_total", reason="spool_full") == 0

    messages = consume_all(bootstrap, topic, produced)
    seqs = [decode_frame(m.value()).seq for m in messages]
    first_seen: list[int] = []
    seen: set[int] = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            first_seen.append(s)
    assert first_seen == list(range(produced)), "a frame was lost or reordered"
    assert {m.partition() for m in messages} == {messages[0].partition()}
    print(f"produced {produced} frames, spooled {sink.spooled_frames} "
          f"(peak {frozen_spool}), duplicates {len(seqs) - produced}")


@pytest.mark.slow
def test_frames_unsent_at_exit_are_kept_and_sent_first_by_the_next_start(
        own_broker: tuple[str, int], tmp_path: Path) -> None:
    bootstrap, broker_pid = own_broker
    topic = "agent-restart"
    create_topics(bootstrap, {topic: 1})
    settings = dataclasses.replace(KafkaSettings(), bootstrap=bootstrap, raw_topic=topic)
    spool_dir = tmp_path / "spool"
    framer = Framer("n1", max_events=10)
    first = make_sink(settings, "n1", spool_dir, max_in_flight=32, stall_after_ms=500)
    frames = frames_of(framer, 200, 0)                  # 20 frames while the broker is up
    for frame in frames:
        first.send(frame)
    wait_for(lambda: first.in_flight == 0, 20, "acknowledgements", first.poll)
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        later = frames_of(framer, 1000, 200)             # 100 more: 32 in flight, then the spool
        for frame in later:
            first.send(frame)
            first.poll()
        first.close(timeout_s=1.0)                       # the broker never answers
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    kept = Spool(spool_dir)
    assert kept.frames == len(later)
    assert [decode_frame(p).seq for p, _ in kept.read(1000)] == [f.seq for f in later]
    kept.close()

    second = make_sink(settings, "n1", spool_dir)
    wait_for(lambda: second.spool.empty and second.in_flight == 0, 30, "the spool to drain",
             second.poll)
    second.close()
    messages = consume_all(bootstrap, topic, len(frames) + len(later))
    first_seen = list(dict.fromkeys(decode_frame(m.value()).seq for m in messages))
    assert first_seen == list(range(len(frames) + len(later)))


def test_compressed_frames_are_read_by_fausts_client(infra: Any, tmp_path: Path) -> None:
    """The agent sends lz4 batches; aiokafka (what `weft stitch` reads with) must decode them —
    it needs cramjam for that, and without it fails with UnsupportedCodecError."""
    topic = f"agent-lz4-{uuid.uuid4().hex[:8]}"
    infra.create_topic(topic, 1)
    settings = dataclasses.replace(infra.kafka_settings(), raw_topic=topic)
    sink = make_sink(settings, "node-z", tmp_path / "spool")
    assert sink._conf["compression.type"] == "lz4"
    frames = frames_of(Framer("node-z", max_events=50), 500, 0)
    for frame in frames:
        sink.send(frame)
    sink.close(timeout_s=20)

    async def read() -> list[int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            part = AioPartition(topic, 0)
            consumer.assign([part])
            await consumer.seek_to_beginning(part)
            seqs: list[int] = []
            while len(seqs) < len(frames):
                batch = await consumer.getmany(part, timeout_ms=5000)
                assert batch, "aiokafka read nothing"
                seqs += [decode_frame(rec.value).seq for rec in batch[part]]
            return seqs
        finally:
            await consumer.stop()

    assert asyncio.run(read()) == [f.seq for f in frames]
