"""`weft stitch` end to end: real broker, real Redis, two Faust workers (subprocesses) on four
partitions, a real OTLP/gRPC receiver. The exported spans must be exactly (ids, parents, every
field) what the offline rebuild of the same frames gives, each exactly once; garbage goes to the
dead-letter topic with its reason."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from infra.procs import free_port
from schemas import weft_events_pb2 as pb
from schemas.codec import encode_frame, make_frame, wrap
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from tests.http_get import http_get
from tests.integration.stitch_harness import (
    StitchRun,
    read_topic,
    rebuild_spans,
    received_bytes,
    scrape_metrics,
    scrape_until_exported,
    span_bytes,
)
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra, pytest.mark.slow]

GARBAGE = b"\x08\x96\x01 this is not a Weft frame \xff\xfe"
# A well-formed frame holding one event the engine cannot use: an HTTP request without a role.
ROLELESS = wrap(pb.HttpRequest(start_ns=1, end_ns=2, pid=7, tid=7, method="GET", path="/roleless"))


@dataclass
class StreamResult:
    run: StitchRun
    expected: list[bytes]
    received: list[bytes]
    exit_codes: list[int]
    frames_done: list[int]
    frames_sent: int
    metrics: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]]  # per worker, at the end
    probes: list[dict[str, tuple[int, str]]]   # per worker: /healthz and /readyz → (status, text)


@pytest.fixture(scope="module")
def two_workers(infra: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamResult]:
    sim = Simulation(SimConfig(nodes=6, rps=25, seconds=3, seed=11))
    sim.run()
    expected = span_bytes(rebuild_spans(interleaved_frames(sim), sim.node_names))
    logs = tmp_path_factory.mktemp("stitch-logs")
    run = StitchRun.fresh(infra, sim.node_names, partitions=4)
    with OtlpReceiver() as rx:
        try:
            ports = [free_port(), free_port()]
            for i in range(2):
                run.start_worker(logs / f"worker{i}.log", rx.endpoint,
                                 {"WEFT_STITCH_METRICS_PORT": str(ports[i])})
            run.wait_assigned(4)  # both in the group before any frame arrives
            node = sim.node_names[0]
            bad = encode_frame(make_frame(node, [ROLELESS], agent_instance=0xBAD))
            sent = run.produce(interleaved_frames(sim),
                               extra=[(b"node-garbage", GARBAGE), (node.encode(), bad)])
            rx.wait_for(len(expected), timeout=90)
            run.wait_consumed(4, sent + 2)  # + the two bad records; spans can be out before the tail
            metrics = scrape_until_exported(ports, len(expected))
            probes = [{p: http_get(f"http://127.0.0.1:{port}{p}") for p in ("/healthz", "/readyz")}
                      for port in ports]
        finally:
            codes = [w.stop() for w in run.workers]  # SIGTERM: flush, then exit
        yield StreamResult(run, expected, received_bytes(rx.requests), codes,
                           [w.frames_done() for w in run.workers], sent, metrics, probes)


def test_two_workers_export_exactly_the_rebuild(two_workers: StreamResult) -> None:
    r = two_workers
    assert len(r.expected) > 500
    assert len(r.received) == len(set(r.received)), "a span was exported twice"
    assert r.received == r.expected


def test_both_workers_did_work_and_exited_cleanly(two_workers: StreamResult) -> None:
    r = two_workers
    assert r.exit_codes == [0, 0], [w.tail() for w in r.run.workers]
    assert all(n > 0 for n in r.frames_done), r.frames_done
    assert sum(r.frames_done) == r.frames_sent + 1  # every frame once (+ the roleless one); not the garbage


def test_the_workers_metrics_count_what_they_did(two_workers: StreamResult) -> None:
    r = two_workers

    def total(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return sum(m.get(key, 0) for m in r.metrics)

    assert total("weft_stitch_frames_total") == r.frames_sent + 1   # as frames_done: not the garbage
    assert total("weft_stitch_spans_total") == len(r.expected)
    assert total("weft_stitch_export_spans_total", result="exported") == len(r.expected)
    assert total("weft_stitch_export_spans_total", result="failed") == 0
    assert total("weft_stitch_export_spans_total", result="sampled_out") == 0   # no sampler set
    assert total("weft_stitch_dead_letters_total", reason="undecodable frame") == 1
    assert total("weft_stitch_dead_letters_total", reason="invalid event") == 1
    assert total("weft_stitch_links_total", link="cross_node") > 0
    for m in r.metrics:   # each worker knows every node's event time from the shared state
        marks = {dict(labels)["node"]: v for (name, labels), v in m.items()
                 if name == "weft_stitch_node_watermark_seconds"}
        assert set(marks) == set(r.run.nodes) and all(v > 0 for v in marks.values())
        assert m[("weft_stitch_low_watermark_seconds", ())] <= min(marks.values())
        assert m[("weft_stitch_event_time_lag_seconds", ())] > 0
        partitions = [dict(labels)["partition"] for (name, labels), _ in m.items()
                      if name == "weft_stitch_consumer_lag_messages"]
        assert partitions and set(partitions) <= {"0", "1", "2", "3"}


def test_each_worker_answers_its_health_probes(two_workers: StreamResult) -> None:
    for probes in two_workers.probes:
        for path in ("/healthz", "/readyz"):
            status, text = probes[path]
            assert status == 200 and re.fullmatch(r"ok: \d+ messages behind, last batch [\d.]+ s ago\n",
                                                  text), (path, status, text)


def test_garbage_goes_to_the_dead_letter_topic(two_workers: StreamResult) -> None:
    run = two_workers.run
    records = read_topic(run.bootstrap, run.dead_topic, 2)
    assert len(records) == 2
    letters = []
    for _, value in records:
        letter = pb.DeadLetter()
        letter.ParseFromString(value)
        assert letter.source_topic == run.raw_topic
        assert letter.partition >= 0 and letter.offset >= 0
        letters.append(letter)
    garbage, roleless = sorted(letters, key=lambda x: x.reason.startswith("invalid"))
    assert garbage.payload == GARBAGE
    assert garbage.reason.startswith("undecodable frame: not a Weft frame")
    assert roleless.reason.startswith("invalid event: HTTP request without a role")
    assert pb.Event.FromString(roleless.payload) == ROLELESS and roleless.node == two_workers.run.nodes[0]



def test_the_worker_consumer_waits_at_most_fetch_max_wait_ms() -> None:
    # Faust hard-codes a 1.5 s fetch wait; a broker that holds a fetch to its end (Tansu) adds
    # that to every span's export delay. `weft stitch` builds its consumer with its own wait.
    import asyncio

    from stitcher.faust_fetch import app_class

    async def consumer_wait() -> int:
        app = app_class(123)("weft-test-fetch", broker="kafka://127.0.0.1:9", web_enabled=False,
                             autodiscover=False, store="memory://")
        thread: Any = app.consumer._thread  # type: ignore[attr-defined]  # the aiokafka driver's
        consumer = thread._create_worker_consumer(app.transport)
        try:
            return int(consumer._fetch_max_wait_ms)  # what AIOKafkaConsumer.start() gives its Fetcher
        finally:
            await consumer.stop()

    assert asyncio.run(consumer_wait()) == 123


def test_partitions_lost_in_a_rebalance_leave_the_workers_lag(infra: Any, tmp_path: Path) -> None:
    """A worker reports consumer lag only for the partitions it reads: when a second worker joins
    and takes half of them, their last lag leaves the first worker's metrics (and its hold on
    node timeouts) — Faust's revoke signal reaches ConsumerLag.forget."""
    sim = Simulation(SimConfig(nodes=4, rps=20, seconds=1, seed=5))
    sim.run()
    run = StitchRun.fresh(infra, sim.node_names, partitions=4)
    ports = [free_port(), free_port()]

    def lag_partitions(port: int) -> set[int]:
        return {int(dict(labels)["partition"]) for (name, labels), _ in scrape_metrics(port).items()
                if name == "weft_stitch_consumer_lag_messages"}

    def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    with OtlpReceiver() as rx:
        try:
            first = run.start_worker(tmp_path / "first.log", rx.endpoint,
                                     {"WEFT_STITCH_METRICS_PORT": str(ports[0])})
            run.wait_assigned(4)
            producer = Producer({"bootstrap.servers": run.bootstrap})
            part = {node: i for i, node in enumerate(sim.node_names)}   # one node per partition
            for frame in interleaved_frames(sim):
                producer.produce(run.raw_topic, encode_frame(frame), frame.node.encode(),
                                 partition=part[frame.node])
            assert producer.flush(30) == 0
            until(lambda: lag_partitions(ports[0]) == {0, 1, 2, 3}, "lag of all four partitions")
            run.start_worker(tmp_path / "second.log", rx.endpoint,
                             {"WEFT_STITCH_METRICS_PORT": str(ports[1])})
            run.wait_assigned(4, timeout=90)
            kept = first.assignment()
            assert 0 < len(kept) < 4, kept
            until(lambda: lag_partitions(ports[0]) <= kept, f"worker 1's lag to shrink to {sorted(kept)}", 30)
        finally:
            run.stop_all()
