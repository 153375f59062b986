"""Helpers for the streaming tests and bench: `weft stitch` workers as subprocesses, frames to
a topic, the offline rebuild of the same frames, OTLP span bytes for exact comparison."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from schemas import weft_events_pb2 as pb
from schemas.codec import encode_frame
from stitcher.engine import Engine, EngineConfig, Span
from stitcher.otlp_convert import span_to_proto
from stitcher.state_memory import MemoryStateStore

WEFT = str(Path(sys.executable).parent / "weft")
_ASSIGNED = re.compile(r"weft-stitch pid \d+ assigned \S+ partitions \[([\d, ]*)\]")
_DONE = re.compile(r"weft-stitch pid \d+ done: frames=(\d+)")


@dataclass
class StitchRun:
    """Names that keep one test's topic, group and Redis keys apart from every other run."""

    bootstrap: str
    redis_url: str
    raw_topic: str
    dead_topic: str
    group: str
    namespace: str
    nodes: Sequence[str]
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def fresh(cls, infra: object, nodes: Sequence[str], partitions: int = 4) -> StitchRun:
        tag = uuid.uuid4().hex[:8]
        run = cls(bootstrap=infra.bootstrap, redis_url=infra.redis_url,  # type: ignore[attr-defined]
                  raw_topic=f"weft.raw.{tag}", dead_topic=f"weft.dead.{tag}", group=f"weft-stitch-{tag}",
                  namespace=f"t{tag}:", nodes=list(nodes))
        infra.create_topic(run.raw_topic, partitions)  # type: ignore[attr-defined]
        infra.create_topic(run.dead_topic, 1)  # type: ignore[attr-defined]
        return run

    def start_worker(self, log: Path, otlp_endpoint: str, extra_env: dict[str, str] | None = None) -> Worker:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "WEFT_KAFKA_DEAD_LETTER_TOPIC": self.dead_topic,
               **(extra_env or {})}
        argv = [WEFT, "-v", "stitch", "--bootstrap", self.bootstrap, "--topic", self.raw_topic,
                "--redis-url", self.redis_url, "--group", self.group, "--namespace", self.namespace,
                "--session-timeout", "10"]
        for node in self.nodes:
            argv += ["--expect-node", node]
        fh = open(log, "wb")  # noqa: SIM115 - closed by Worker.stop
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        worker = Worker(proc, log, fh)
        self.workers.append(worker)
        return worker

    def wait_assigned(self, partitions: int, timeout: float = 60) -> None:
        """Until every worker's latest assignment is non-empty and together they cover all."""
        deadline = time.monotonic() + timeout
        while True:
            latest = [w.assignment() for w in self.workers]
            if all(latest) and set().union(*latest) == set(range(partitions)) and \
                    sum(len(a) for a in latest) == partitions:
                return
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"stitch worker exited ({w.proc.returncode}):\n{w.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions not assigned in {timeout} s: {latest}\n"
                                   + "\n".join(w.tail() for w in self.workers))
            time.sleep(0.2)

    def produce(self, frames: Iterable[pb.Frame], extra: Iterable[tuple[bytes, bytes]] = ()) -> int:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                             "linger.ms": 5})
        n = 0
        for frame in frames:
            producer.produce(self.raw_topic, encode_frame(frame), frame.node.encode())
            producer.poll(0)
            n += 1
        for key, value in extra:
            producer.produce(self.raw_topic, value, key)
        assert producer.flush(30) == 0
        return n

    def wait_consumed(self, partitions: int, messages: int, timeout: float = 60) -> None:
        """Until the group's committed offsets cover `messages` records on the raw topic (all
        produced from offset 0): the workers took every frame (spans can all be out well before
        the tail of watermark-only frames is read). Tansu's ListOffsets reply is not usable as
        the end of a partition here, hence the count."""
        from confluent_kafka import TopicPartition

        probe = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group,
                          "enable.auto.commit": False})
        tps = [TopicPartition(self.raw_topic, p) for p in range(partitions)]
        deadline = time.monotonic() + timeout
        try:
            while True:
                done = sum(max(tp.offset, 0) for tp in probe.committed(tps, timeout=10))
                if done >= messages:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {self.group} committed {done} of {messages} records "
                                       f"in {timeout} s")
                time.sleep(0.2)
        finally:
            probe.close()

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    _fh: object

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def assignment(self) -> set[int]:
        found = _ASSIGNED.findall(self.text())
        return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()

    def frames_done(self) -> int:
        found = _DONE.findall(self.text())
        return int(found[-1]) if found else -1

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()  # type: ignore[attr-defined]
        return self.proc.returncode


def rebuild_spans(frames: Iterable[pb.Frame], nodes: Sequence[str],
                  config: EngineConfig | None = None) -> list[Span]:
    """The offline answer: the same frames through the engine with the in-memory store."""
    engine = Engine(MemoryStateStore(), config)
    engine.expect_nodes(nodes)
    spans: list[Span] = []
    for frame in frames:
        spans.extend(engine.process(frame))
    spans.extend(engine.flush())
    return spans


def span_bytes(spans: Iterable[Span]) -> list[bytes]:
    return sorted(span_to_proto(s).SerializeToString(deterministic=True) for s in spans)


def received_bytes(requests: Iterable[ExportTraceServiceRequest]) -> list[bytes]:
    return sorted(s.SerializeToString(deterministic=True) for r in requests
                  for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans)


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 30) -> list[tuple[bytes, bytes]]:
    """The first n (key, value) records of a topic, read from the beginning."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"weft-test-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            out.append((msg.key() or b"", msg.value() or b""))
    finally:
        consumer.close()
    return out


def scrape_until_exported(ports: list[int], spans: int, timeout: float = 30) -> list[
        dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Every worker's metrics, once their exporters have counted `spans` between them (a
    receiver has the spans a moment before the exporter counts its batch confirmed)."""
    deadline = time.monotonic() + timeout
    while True:
        scraped = [scrape_metrics(p) for p in ports]
        done = sum(m.get(("weft_stitch_export_spans_total", (("result", "exported"),)), 0) for m in scraped)
        if done >= spans or time.monotonic() > deadline:
            return scraped
        time.sleep(0.2)


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}
