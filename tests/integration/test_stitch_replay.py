"""`weft replay`: a topic re-stitched from offset 0 gives exactly the offline rebuild of the same
frames — with the in-memory store into a file, and with Redis (own namespace) over OTLP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from confluent_kafka import Producer

from infra.broker import create_topics, start_broker
from infra.procs import free_port, stop_daemon
from schemas.codec import encode_frame
from stitcher.otlp_convert import request_from_json
from stitcher.replay import _TopicReader, replay
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.sinks import JsonLinesSink
from stitcher.state_memory import MemoryStateStore
from tests.integration.stitch_harness import WEFT, StitchRun, rebuild_spans, received_bytes, span_bytes
from tests.otlp_receiver import OtlpReceiver
from tests.redis_cluster import LocalCluster
from weft.config import KafkaSettings

pytestmark = [pytest.mark.infra, pytest.mark.slow]


@pytest.fixture(scope="module")
def topic_with_frames(infra: Any) -> tuple[StitchRun, list[bytes]]:
    sim = Simulation(SimConfig(nodes=5, rps=20, seconds=3, seed=23))
    sim.run()
    run = StitchRun.fresh(infra, sim.node_names, partitions=3)
    run.produce(interleaved_frames(sim), extra=[(b"bad", b"not a frame")])
    return run, span_bytes(rebuild_spans(interleaved_frames(sim), sim.node_names))


def test_replay_into_a_file_equals_the_rebuild(infra: Any, topic_with_frames: tuple[StitchRun, list[bytes]],
                                               tmp_path: Any) -> None:
    run, expected = topic_with_frames
    out = tmp_path / "replay.jsonl"
    sink = JsonLinesSink(out)
    result = replay(infra.kafka_settings(), run.raw_topic, MemoryStateStore(), sink)
    sink.shutdown()
    got = received_bytes(request_from_json(line) for line in out.read_text().splitlines())
    assert result.undecodable == 1
    assert result.spans == len(expected)
    assert got == expected


Frames = tuple[StitchRun, list[bytes]]


def test_replay_cli_with_redis_over_otlp(infra: Any, topic_with_frames: Frames) -> None:
    run, expected = topic_with_frames
    with OtlpReceiver() as rx:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        proc = subprocess.run([WEFT, "replay", "--bootstrap", run.bootstrap, "--topic", run.raw_topic,
                               "--store", "redis", "--redis-url", run.redis_url, "--otlp"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert received_bytes(rx.requests) == expected
    namespace = re.search(r"namespace '([^']+)'", proc.stderr)
    assert namespace is not None, proc.stderr
    client = redis.Redis.from_url(run.redis_url)
    keys = list(client.scan_iter(match=f"{namespace.group(1)}*", count=1000))
    assert keys, "replay state should be in its own namespace"
    assert all(client.ttl(k) > 0 for k in keys[:50])
    assert f"{len(expected)} spans" in proc.stdout


def test_replay_cli_on_redis_cluster(infra: Any, redis_cluster: LocalCluster,
                                     topic_with_frames: Frames) -> None:
    """With `stitch.cluster` on (as the workers run), `weft replay --store redis` keeps its state
    on the Redis Cluster too."""
    run, expected = topic_with_frames
    with OtlpReceiver() as rx:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "WEFT_STITCH_CLUSTER": "true",
               "WEFT_REDIS_PASSWORD": redis_cluster.password}
        proc = subprocess.run([WEFT, "replay", "--bootstrap", run.bootstrap, "--topic", run.raw_topic,
                               "--store", "redis", "--redis-url", redis_cluster.url,
                               "--namespace", "replay-cl:", "--otlp"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert received_bytes(rx.requests) == expected
    for port in redis_cluster.ports:
        node = redis_cluster.node(port)
        assert node.keys("replay-cl:w:*"), f"primary {port} holds none of the replay's state"
        node.close()


@pytest.mark.slow
def test_a_replay_whose_broker_stops_answering_ends_in_one_sentence(tmp_path: Path) -> None:
    """The broker freezes once the replay has its metadata (SIGSTOP: connections stay open,
    nothing comes back): the reader gives up after its stall timeout instead of waiting forever."""
    port = free_port()
    broker = start_broker(tmp_path / "broker", port)
    bootstrap, topic = f"127.0.0.1:{port}", f"weft.raw.{uuid.uuid4().hex[:8]}"
    try:
        create_topics(bootstrap, {topic: 2})
        sim = Simulation(SimConfig(nodes=2, rps=10, seconds=1, seed=3))
        sim.run()
        producer = Producer({"bootstrap.servers": bootstrap})
        for frame in interleaved_frames(sim):
            producer.produce(topic, encode_frame(frame), frame.node.encode())
        assert producer.flush(20) == 0
        reader = _TopicReader(KafkaSettings(bootstrap=bootstrap), topic, stall_s=3)   # metadata read
        os.kill(broker.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            reader.rewind()
            with pytest.raises(click.ClickException) as stalled:
                while time.monotonic() - frozen < 30:
                    reader.batch()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
            reader.close()
        waited = time.monotonic() - frozen
        assert 3 <= waited < 10, waited
        assert re.fullmatch(rf"reading {topic}: nothing from {bootstrap} for 3 s with 2 of 2 partitions "
                            r"unread to their end; is the broker still reachable\? The replay is incomplete",
                            stalled.value.message), stalled.value.message
    finally:
        stop_daemon(broker)
