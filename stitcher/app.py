"""`weft stitch`: the Faust app that turns raw event frames into traces, with join state in Redis.

Pipeline per Kafka message (one frame = one node's batch of events):
    decode (schemas.codec) → engine under the frame lease (RedisStateStore) → OTLP export.

Rules from DESIGN.md ("Facts about the stream pieces here") and how they are kept:
* Faust acks a message even when the agent raises, silently losing it. So nothing escapes the
  agent: undecodable or engine-rejected frames go to the dead-letter topic with the reason
  (`FrameStitcher`); store failures are retried with backoff, and when they persist the worker
  flushes its exporter and exits hard (`os._exit`) so the frame is not acked and is redelivered.
* Offsets are committed only after Redis succeeded: a frame is acked (the agent moves on) only
  after the engine's single `apply` returned. Before each commit, a Faust sensor flushes the
  exporter, so a committed frame's spans were handed to the OTLP receiver.
* A worker killed after the engine's commit but before its exporter flushed: the frames since
  the last offset commit are redelivered, but their spans are already marked emitted, so the
  engine would not emit them again. So the engine keeps emitted span ids in an outbox (same
  Redis commit) until the flush succeeded (`acknowledge_exported`), and a starting worker
  exports what the outbox still holds (`export_unacknowledged`): a span may be exported twice,
  always with the same IDs and contents, never lost.
* One worker or many: the engine's state — including every node's watermark and the due
  schedule — lives in Redis, and a Redis lease (`FrameLease`) runs one engine frame at a time
  across workers, so N workers on several partitions produce exactly what one worker does.
* Frames reach the engine in batches (`stream.take_events`: up to `batch_frames`, waiting at
  most `batch_wait_ms` for more): one store load and one `apply` per batch instead of per
  frame. take_events acks a batch only after the agent's body returned, so the rules above
  hold per batch; the engine's output does not depend on how the stream is cut.
* Each worker mirrors the node-local sorted sets (thread lineage, per-thread requests) it
  reads; Redis stays the source of truth and a copy is used only while no other worker wrote
  that node (`stitch.node_mirror`, see stitcher/state_redis.py).
* concurrency=1, no Tables, no group_by, web server off, session timeout configurable (~10 s
  in tests, where Tansu takes about half of it to form a group).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click
import redis
from prometheus_client import CollectorRegistry

from schemas import weft_events_pb2 as pb
from schemas.codec import CodecError, decode_frame
from stitcher.consumer_lag import ConsumerLag
from stitcher.deadletter import DeadLetterProducer
from stitcher.engine import Engine, EngineConfig, Span
from stitcher.engine.core import invalid_http
from stitcher.health import WorkerHealth
from stitcher.metrics import StitchCollector
from stitcher.metrics import serve as serve_metrics
from stitcher.routes import RouteSettings, routed
from stitcher.sampling import sampled
from stitcher.sinks import JsonLinesSink, SpanSink
from stitcher.state_redis import FrameLease, LeaseLostError, RedisStateStore
from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section, run_dir
from weft.logs import thin_client_logs
from weft.sampling import TraceSampler

logger = logging.getLogger(__name__)

EXIT_STORE_DOWN = 75  # EX_TEMPFAIL: the state store stayed unavailable; restart me

# "The store is unavailable, try again"; any other exception from the engine is the frame's own.
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, LeaseLostError, OSError)


# ----------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class StitchSettings:
    group_id: str = "weft-stitch"         # the Faust app id = Kafka consumer group
    session_timeout_s: float = 30.0
    heartbeat_interval_s: float = 3.0
    commit_interval_s: float = 1.0
    lease_ttl_ms: int = 10_000
    store_attempts: int = 8               # store failures in a row before exiting hard
    namespace: str = ""                   # Redis key prefix (separates replays / test runs)
    cluster: bool = False                 # Redis Cluster client and slot-split batches
    expect_nodes: str = ""                # comma-separated nodes to wait for before they speak
    fetch_max_wait_ms: int = 100          # longest Kafka fetch wait (Faust's own: 1500; see faust_fetch)
    hold_timeouts_lag: int = 20           # unread messages on a partition that hold node timeouts
    batch_frames: int = 32                # frames handed to the engine together (one load, one apply)
    batch_wait_ms: int = 20               # longest wait for a batch to fill (adds to export latency)
    node_mirror: bool = True              # keep node-local sorted sets read from Redis in memory
    metrics_port: int = 0                 # Prometheus endpoint; 0 = off
    metrics_addr: str = "127.0.0.1"
    startup_wait_s: float = 30.0          # how long to wait at start for Kafka and Redis to answer
    stop_timeout_s: float = 15.0          # how long Faust may take to stop before the worker leaves anyway
    health_stall_s: float = 60.0          # /healthz fails after this long without the event loop
                                          # running, or behind without a batch joined

    def expected(self) -> list[str]:
        return [n.strip() for n in self.expect_nodes.split(",") if n.strip()]

    def validate(self) -> StitchSettings:
        if not self.group_id:
            raise ConfigError("stitch.group_id is empty: name the consumer group")
        if self.session_timeout_s < 1 or self.heartbeat_interval_s <= 0:
            raise ConfigError("stitch.session_timeout_s must be >= 1 and heartbeat_interval_s > 0")
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ConfigError(f"stitch.heartbeat_interval_s={self.heartbeat_interval_s} must be at most "
                              f"a third of session_timeout_s={self.session_timeout_s}")
        if self.lease_ttl_ms < 100 or self.store_attempts < 1 or self.commit_interval_s <= 0:
            raise ConfigError("stitch.lease_ttl_ms must be >= 100, store_attempts >= 1, "
                              "commit_interval_s > 0")
        if self.hold_timeouts_lag < 0:
            raise ConfigError(f"stitch.hold_timeouts_lag={self.hold_timeouts_lag}: must be >= 0")
        if not 1 <= self.batch_frames <= 10_000 or not 1 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"stitch.batch_frames={self.batch_frames} and batch_wait_ms="
                              f"{self.batch_wait_ms}: each must be 1..10000")
        if self.startup_wait_s < 0:
            raise ConfigError(f"stitch.startup_wait_s={self.startup_wait_s}: must be >= 0")
        if self.stop_timeout_s <= 0 or self.health_stall_s <= 0:
            raise ConfigError(f"stitch.stop_timeout_s={self.stop_timeout_s} and health_stall_s="
                              f"{self.health_stall_s}: each must be > 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"stitch.metrics_port={self.metrics_port}: must be 0 (off) or a TCP port")
        if not 1 <= self.fetch_max_wait_ms <= 60_000:
            raise ConfigError(f"stitch.fetch_max_wait_ms={self.fetch_max_wait_ms}: must be 1..60000")
        return self


# --------------------------------------------------------------------------- frame stitching


@dataclass(frozen=True)
class Where:
    """Where a raw value came from (for dead letters and logs)."""

    topic: str = ""
    partition: int = -1
    offset: int = -1

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Pending(NamedTuple):
    """A decoded frame waiting for the engine, with its raw value and origin (dead letters)."""

    frame: pb.Frame
    value: bytes
    where: Where


@dataclass
class StitchCounters:
    frames: int = 0
    events: int = 0
    spans: int = 0
    dead_letters: int = 0
    store_retries: int = 0
    lease_waits: int = 0
    batches: int = 0
    engine_seconds: float = 0.0   # in the engine, store round trips included (rate = busy share)
    # dead letters by the part of the reason before its first colon ("undecodable frame",
    # "invalid event", "engine error")
    dead_letter_kinds: Counter[str] = field(default_factory=Counter)


class FrameStitcher:
    """Raw value → spans: decode, dead-letter, engine under the lease, export. Shared by the
    Faust agent (async waits) and `weft replay` (blocking waits)."""

    def __init__(self, engine: Engine, sink: SpanSink, *, dead_letters: DeadLetterProducer | None,
                 lease: FrameLease | None, store_attempts: int = 8, hold_s: float = 0.05) -> None:
        self.engine = engine
        self.hold_s = hold_s
        self._held_since = self._last_done = 0.0
        self.sink = sink
        self.dead_letters = dead_letters
        self.lease = lease
        self.store_attempts = store_attempts
        self.counters = StitchCounters()
        self._exported_ids: list[str] = []   # handed to the sink since the last acknowledgement

    def decode(self, value: bytes | None, where: Where) -> pb.Frame | None:
        """The frame in `value`, or None after dead-lettering it (raises if that fails)."""
        try:
            frame = decode_frame(value or b"", str(where))
        except CodecError as exc:
            self.dead_letter(f"undecodable frame: {exc.reason}", value or b"", where)
            return None
        for event in frame.events:  # the engine skips these; the dead-letter topic keeps them
            if event.WhichOneof("kind") == "http" and (reason := invalid_http(event.http)):
                self.dead_letter(reason, event.SerializeToString(), where, node=frame.node)
        return frame

    def dead_letter(self, reason: str, payload: bytes, where: Where, node: str = "") -> None:
        self.counters.dead_letters += 1
        self.counters.dead_letter_kinds[reason.partition(":")[0]] += 1
        if self.dead_letters is None:
            logger.error("dropped %s (no dead-letter topic): %s", where, reason)
            return
        self.dead_letters.send(reason, payload, source_topic=where.topic, partition=where.partition,
                               offset=where.offset, node=node)

    def try_apply(self, batch: Sequence[Pending]) -> list[Span] | None:
        """One attempt at a batch of decoded frames: take the lease (None when another worker
        holds it), run the engine over the whole batch (one load of what it names, one sweep,
        one `apply`), hand the spans to the sink. Raises one of STORE_ERRORS when the store
        failed; the engine writes a batch in one `apply` at its end, so a failed attempt wrote
        nothing. A frame the engine refuses is found by redoing the batch frame by frame, and
        dead-lettered; the others are stitched.

        A worker keeps the lease for up to `hold_s` over consecutive batches (handing it over
        costs the other worker a poll); `release_if_idle()` gives it back between bursts."""
        lease = self.lease
        if lease is not None and not lease.held:
            if not lease.try_acquire():
                self.counters.lease_waits += 1
                return None
            self._held_since = time.monotonic()
        failed = True
        exported = False   # the frame-by-frame path exports as it goes
        started = time.perf_counter()
        try:
            try:
                spans = self.engine.process_frames([p.frame for p in batch])
            except STORE_ERRORS:
                raise
            except Exception as exc:  # a frame the engine refuses will never succeed
                self._fresh_engine()
                if len(batch) == 1:
                    self._refused(batch[0], exc)
                    spans = []
                else:  # find it; each frame's spans go out as soon as its own apply is done
                    spans = [span for p in batch for span in self._frame_alone(p)]
                    exported = True
            failed = False
        except STORE_ERRORS:
            self._fresh_engine()
            raise
        finally:
            self._last_done = time.monotonic()
            self.counters.engine_seconds += time.perf_counter() - started
            if lease is not None and lease.held and (
                    failed or self._last_done - self._held_since >= self.hold_s):
                lease.release()
        c = self.counters
        c.batches += 1
        c.frames += len(batch)
        c.events += sum(len(p.frame.events) for p in batch)
        c.spans += len(spans)
        if not exported:
            self._export(spans)
        return spans

    def _frame_alone(self, pending: Pending) -> list[Span]:
        """One frame through the engine on its own (raises STORE_ERRORS; a refused frame is
        dead-lettered); exports its spans."""
        try:
            spans = self.engine.process(pending.frame)
        except STORE_ERRORS:
            raise
        except Exception as exc:
            self._fresh_engine()
            self._refused(pending, exc)
            return []
        self._export(spans)
        return spans

    def _refused(self, pending: Pending, exc: Exception) -> None:
        logger.error("engine failed on frame %s", pending.where, exc_info=exc)
        self.dead_letter(f"engine error: {type(exc).__name__}: {exc}", pending.value, pending.where,
                         pending.frame.node)

    def _export(self, spans: Sequence[Span]) -> None:
        self.sink.export(spans)
        if self.engine.outbox:
            self._exported_ids.extend(s.span_id.hex() for s in spans)

    def export_unacknowledged(self) -> int:
        """Export again what a killed worker left in the outbox; how many spans."""
        if not self.engine.outbox:
            return 0
        spans = self.engine.unacknowledged()
        self._export(spans)
        if spans:
            logger.warning("exported %d spans again that an earlier worker stitched but may not "
                           "have exported (same IDs: a backend drops the copies)", len(spans))
        return len(spans)

    def unacknowledged_count(self) -> int:
        """Spans handed to the sink since its last confirmed flush."""
        return len(self._exported_ids)

    def acknowledge_exported(self) -> None:
        """The sink flushed: what it was handed leaves the outbox. A failure only means those
        spans are exported once more by a later worker."""
        done, self._exported_ids = self._exported_ids, []
        try:
            self.engine.acknowledge(done)
        except STORE_ERRORS as exc:
            logger.warning("could not acknowledge %d exported spans (%s); a later worker "
                           "may export them again", len(done), exc)

    @property
    def last_batch_at(self) -> float:
        """time.monotonic() when the last batch ended, joined or failed (0.0: none yet)."""
        return self._last_done

    def release_if_idle(self, idle_s: float = 0.002) -> None:
        """Give the lease back when no frame came for `idle_s` (called between frames)."""
        if self.lease is not None and self.lease.held and time.monotonic() - self._last_done >= idle_s:
            self.lease.release()

    def _fresh_engine(self) -> None:
        """Forget what a failed attempt cached inside the engine; keep its counters."""
        old = self.engine
        self.engine = type(old)(old.store, old.config)
        self.engine.stats, self.engine.outbox = old.stats, old.outbox
        self.engine.hold_node_timeouts = old.hold_node_timeouts

    def _failed(self, exc: Exception, attempts: int) -> float:
        """Count a store failure; the backoff before the next attempt."""
        self.counters.store_retries += 1
        backoff = min(0.05 * float(2 ** (attempts - 1)), 5.0)
        logger.warning("state store failed (%s); attempt %d of %d, next in %.2f s",
                       exc, attempts, self.store_attempts, backoff)
        return backoff

    def apply_blocking(self, frame: pb.Frame, value: bytes, where: Where) -> list[Span]:
        """try_apply of one frame until it succeeds; re-raises the store error after
        store_attempts."""
        batch = [Pending(frame, value, where)]
        attempts = waits = 0
        while True:
            try:
                spans = self.try_apply(batch)
            except STORE_ERRORS as exc:
                attempts += 1
                if attempts >= self.store_attempts:
                    raise
                time.sleep(self._failed(exc, attempts))
                continue
            if spans is not None:
                return spans
            waits += 1
            time.sleep(_lease_poll_s(waits))

    async def apply_async(self, batch: Sequence[Pending]) -> list[Span]:
        """try_apply of a batch until it succeeds, waiting without blocking the event loop."""
        attempts = waits = 0
        while True:
            try:
                spans = self.try_apply(batch)
            except STORE_ERRORS as exc:
                attempts += 1
                if attempts >= self.store_attempts:
                    raise
                await asyncio.sleep(self._failed(exc, attempts))
                continue
            if spans is not None:
                return spans
            waits += 1
            await asyncio.sleep(_lease_poll_s(waits))


def _lease_poll_s(waits: int) -> float:
    """Pause before asking for the frame lease again: 0.5 ms doubling to 4 ms. Every ask is a
    script call on the Redis the lease holder is working against; the holder keeps the lease
    up to `hold_s` (50 ms), and the asking worker's marker keeps it from taking it back, so a
    few ms of polling granularity cost little idle time and spare the holder's Redis."""
    return min(0.0005 * (1 << min(waits - 1, 3)), 0.004)


def _described(exc: Exception) -> str:
    """"Type: message": redis-py's own repr of its server errors drops the message (an
    OutOfMemoryError reads "server:OutOfMemoryError"), and the message is the reason."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def exit_hard(sink: SpanSink, reason: str) -> None:
    """Leave without acking or committing anything more: the broker will redeliver."""
    message = f"{reason} — exiting (code {EXIT_STORE_DOWN}) so the frame is redelivered"
    logger.critical(message)
    try:
        sink.force_flush(5.0)
    finally:
        # os._exit skips every buffer: say it on stderr directly so the reason is never lost
        print(f"weft stitch: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_STORE_DOWN)


# ---------------------------------------------------------------------------------- Faust app


def _flush_before_commit(stitcher: FrameStitcher) -> Any:
    """A Faust sensor that flushes the exporter right before Faust commits offsets, then
    acknowledges the flushed spans (they leave the engine's outbox)."""
    from faust.sensors import Sensor

    class FlushBeforeCommit(Sensor):
        def on_commit_initiated(self, consumer: Any) -> Any:
            if stitcher.sink.force_flush(10.0):
                stitcher.acknowledge_exported()
            else:
                logger.error("span export did not finish before the offset commit")
            return None

    return FlushBeforeCommit()


def _credentials(kafka: KafkaSettings) -> Any:
    """Faust (aiokafka) credentials for the same settings confluent-kafka gets."""
    import faust

    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = None
    if kafka.security_protocol.endswith("SSL"):
        ca = kafka.ca_path   # librdkafka takes a CA file or a directory of them
        ca_dir = bool(ca) and Path(ca).is_dir()
        context = ssl.create_default_context(cafile=None if ca_dir else ca or None,
                                             capath=ca if ca_dir else None)
        if kafka.ssl_certificate_location:
            context.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location or None,
                                    kafka.ssl_key_password or None)
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password,
                                     mechanism=kafka.sasl_mechanism, ssl_context=context)
    return faust.SSLCredentials(context)


def make_app(kafka: KafkaSettings, stitcher: FrameStitcher, settings: StitchSettings,
             lag: ConsumerLag | None = None, health: WorkerHealth | None = None) -> Any:
    """The Faust app: one agent on the raw topic, concurrency 1, values as raw bytes."""
    from stitcher.faust_fetch import app_class  # Faust loads here: `weft` starts fast otherwise

    # Faust makes "<id>-data/" in the working directory unless told: keep it with our state.
    datadir = run_dir() / "faust" / settings.group_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = app_class(settings.fetch_max_wait_ms)(
        settings.group_id,
        broker=[f"kafka://{host}" for host in kafka.bootstrap.split(",")],
        broker_credentials=_credentials(kafka),
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        topic_disable_leader=True,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        key_serializer="raw",
        value_serializer="raw",
    )
    app.sensors.add(_flush_before_commit(stitcher))
    topic = app.topic(kafka.raw_topic, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")

    lag = lag if lag is not None else ConsumerLag(settings.hold_timeouts_lag)

    async def stitch(stream: Any) -> None:
        # take_events acks a batch's messages only after this body finished with it; a body
        # that exits hard acks none of them, so they are redelivered.
        async for events in stream.take_events(settings.batch_frames, settings.batch_wait_ms / 1000):
            batch: list[Pending] = []
            try:
                for event in events:
                    msg = event.message
                    where = Where(msg.topic, msg.partition, msg.offset)
                    lag.observe(msg.partition, msg.offset, _highwater(app, msg.tp))
                    value = event.value if isinstance(event.value, bytes) else msg.value
                    frame = stitcher.decode(value, where)
                    if frame is not None:
                        batch.append(Pending(frame, value, where))
                stitcher.engine.hold_node_timeouts = lag.behind
                if batch:
                    await stitcher.apply_async(batch)
            except Exception as exc:  # escaping would ack the batch and lose it
                first, last = events[0].message, events[-1].message
                exit_hard(stitcher.sink, f"frames {first.topic}[{first.partition}]@{first.offset}"
                                         f"..[{last.partition}]@{last.offset} could not be stored: "
                                         f"{_described(exc)}")

    app.agent(topic, name="weft.stitch", concurrency=1)(stitch)

    async def report() -> None:
        if stitcher.dead_letters is not None:
            stitcher.dead_letters.poll()
        c, s = stitcher.counters, stitcher.engine.stats
        logger.info("stitched frames=%d events=%d spans=%d dead_letters=%d lease_waits=%d "
                    "store_retries=%d late=%d ambiguous=%d lost_requests=%d parent_lost=%d "
                    "records_lost=%d", c.frames, c.events, c.spans, c.dead_letters, c.lease_waits,
                    c.store_retries, s.late, s.ambiguous, s.lost_requests, s.parent_lost, s.blind)

    app.timer(10.0)(report)

    async def release_idle() -> None:
        stitcher.release_if_idle()

    app.timer(0.005)(release_idle)

    if health is not None:
        async def beat() -> None:
            health.beat()

        app.timer(1.0)(beat)

    async def assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        tps = args[0] if args else kwargs.get("assigned", ())
        parts = sorted(tp.partition for tp in tps if tp.topic == kafka.raw_topic)
        if health is not None:
            health.joined = True
        logger.info("weft-stitch pid %d assigned %s partitions %s", os.getpid(), kafka.raw_topic, parts)

    async def revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        # a partition another worker now reads must not keep holding this worker's timeouts
        tps = args[0] if args else kwargs.get("revoked", ())
        lag.forget({tp.partition for tp in tps if tp.topic == kafka.raw_topic})

    on_assigned: Any = app.on_partitions_assigned  # mode's stubs reject async receivers
    on_assigned.connect(assigned)
    on_revoked: Any = app.on_partitions_revoked
    on_revoked.connect(revoked)
    return app


def _highwater(app: Any, tp: Any) -> int | None:
    """The broker's next offset for `tp` as of the consumer's last fetch (None when unknown)."""
    try:
        value = app.consumer.highwater(tp)
    except (AssertionError, KeyError, AttributeError):  # not (or no longer) assigned here
        return None
    return value if isinstance(value, int) else None


def wait_for_dependencies(kafka: KafkaSettings | None, redis_settings: RedisSettings | None,
                          wait_s: float) -> None:
    """Before anything starts: Kafka and Redis answer (retried for `wait_s`, as they may be
    starting beside the stitcher), else one sentence naming what is missing and where it was
    looked for (passwords left out), instead of a traceback from deep inside a client."""
    from infra import broker, redis_server

    deadline = time.monotonic() + wait_s
    told: set[str] = set()
    while True:
        checks = {"Redis": redis_server.reachable(redis_settings, timeout_s=2.0) if redis_settings else None,
                  "Kafka": broker.reachable(kafka, timeout_s=2.0) if kafka else None}
        failed = {name: check for name, check in checks.items() if check is not None and not check.ok}
        problems = [f"{name}: {check.detail}" for name, check in failed.items()]
        for check in checks.values():
            if check is not None and check.warning and check.warning not in told:
                logger.warning("%s", check.warning)
                told.add(check.warning)
        if not problems:
            return
        if time.monotonic() >= deadline:
            absent = [name for name, check in failed.items() if not check.listening]
            hint = (" Start them (`weft infra up` for the local ones) or point redis.url / kafka.bootstrap "
                    "(WEFT_REDIS_URL, WEFT_KAFKA_BOOTSTRAP) at running ones." if absent else "")
            raise click.ClickException(f"cannot start: {'; '.join(problems)}.{hint}")
        for problem in problems:
            if problem not in told:
                logger.warning("waiting up to %.0f s for %s", wait_s, problem)
                told.add(problem)
        time.sleep(1.0)


def build_stitcher(kafka: KafkaSettings, redis_settings: RedisSettings, settings: StitchSettings,
                   engine_config: EngineConfig, sink: SpanSink) -> FrameStitcher:
    store = RedisStateStore(redis_settings, cluster=settings.cluster, namespace=settings.namespace,
                            mirror=settings.node_mirror)
    engine = Engine(store, engine_config)
    engine.outbox = True
    if settings.expected():
        engine.expect_nodes(settings.expected())
    return FrameStitcher(engine, sink, dead_letters=DeadLetterProducer(kafka),
                         lease=store.lease(ttl_ms=settings.lease_ttl_ms),
                         store_attempts=settings.store_attempts)


def run_worker(kafka: KafkaSettings, redis_settings: RedisSettings, settings: StitchSettings,
               engine_config: EngineConfig, sink: SpanSink, *, loglevel: str = "info") -> None:
    """Run one stitcher worker until SIGTERM/SIGINT; flushes the sink on the way out."""
    stitcher = build_stitcher(kafka, redis_settings, settings, engine_config, sink)
    stitcher.export_unacknowledged()
    lag = ConsumerLag(settings.hold_timeouts_lag)
    health = WorkerHealth(stitcher, lag, settings.health_stall_s)
    if settings.metrics_port:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(StitchCollector(stitcher, lag))
        port = serve_metrics(registry, settings.metrics_port, settings.metrics_addr,
                             live=health.live, ready=health.ready)
        logger.info("weft-stitch pid %d metrics on http://%s:%d/metrics (and /healthz, /readyz)",
                    os.getpid(), settings.metrics_addr, port)
    app = make_app(kafka, stitcher, settings, lag, health)
    import faust

    finish = _once(lambda: _finish_worker(stitcher, sink))

    def leave_anyway() -> None:
        logger.warning("Faust did not stop within %.0f s (is its broker reachable?): leaving anyway; "
                       "frames not yet committed are read again by the next worker", settings.stop_timeout_s)
        finish()
        logging.shutdown()
        os._exit(0)

    # With its broker gone, Faust's consumer thread dies while stopping and the worker then waits
    # for it forever: a SIGTERM'd worker would hang until SIGKILL, holding its lease to the end.
    watchdog = threading.Timer(settings.stop_timeout_s, leave_anyway)
    watchdog.daemon = True

    class Worker(faust.Worker):
        def on_setup_root_logger(self, root: logging.Logger, level: int) -> None:
            thin_client_logs(root)    # Faust has just installed the root handlers

        async def on_stop(self) -> None:
            if not watchdog.is_alive():
                watchdog.start()
            await super().on_stop()

    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust, aiokafka and the exporters leave many long-lived objects: freeze them so collections
    # stop re-walking them, and collect less often — the engine makes many short-lived acyclic
    # objects per event, and collection was ~15 % of a worker's engine CPU.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        worker.execute_from_commandline()
    finally:
        watchdog.cancel()
        finish()


def _finish_worker(stitcher: FrameStitcher, sink: SpanSink) -> None:
    """A stopping worker's last steps: export what is queued, give the lease back, say so."""
    if sink.force_flush(10.0):
        stitcher.acknowledge_exported()
    if stitcher.lease is not None and stitcher.lease.held:
        stitcher.lease.release()
    sink.shutdown()
    c = stitcher.counters
    logger.info("weft-stitch pid %d done: frames=%d events=%d spans=%d dead_letters=%d",
                os.getpid(), c.frames, c.events, c.spans, c.dead_letters)
    if stitcher.dead_letters is not None:
        stitcher.dead_letters.close()


def _once(step: Callable[[], None]) -> Callable[[], None]:
    """`step` run by the first caller; a second caller (another thread) waits for it to end."""
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if not done:
                done = True
                step()
    return run


# ------------------------------------------------------------------------------------- CLI


@click.command("stitch")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file with kafka/redis/stitch/engine sections (else WEFT_CONFIG)")
@click.option("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap)")
@click.option("--topic", help="raw frame topic (overrides kafka.raw_topic)")
@click.option("--redis-url", help="Redis URL (overrides redis.url)")
@click.option("--group", help="consumer group / Faust app id (overrides stitch.group_id)")
@click.option("--namespace", help="Redis key prefix (overrides stitch.namespace)")
@click.option("--session-timeout", type=float, help="consumer session timeout, seconds")
@click.option("--expect-node", "expect_nodes", multiple=True,
              help="a node to wait for before it has sent anything (repeatable; stitch.expect_nodes)")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="write OTLP JSON lines to FILE instead of exporting over OTLP")
@click.option("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = off)")
def stitch_command(config_file: str | None, bootstrap: str | None, topic: str | None,
                   redis_url: str | None, group: str | None, namespace: str | None,
                   session_timeout: float | None, expect_nodes: tuple[str, ...],
                   out_file: str | None, metrics_port: int | None) -> None:
    """Consume raw event frames, stitch them into traces with state in Redis, export over OTLP.

    Export settings come from the standard OTEL_EXPORTER_OTLP_* variables (protocol grpc or
    http/protobuf, endpoint, headers, timeout, insecure). Run several of these with the same
    group to share the partitions; they produce the same traces as one."""
    kafka = load_section(KafkaSettings, "kafka", config_file=config_file, bootstrap=bootstrap,
                         raw_topic=topic)
    redis_settings = load_section(RedisSettings, "redis", config_file=config_file, url=redis_url)
    overrides: dict[str, Any] = {"group_id": group, "namespace": namespace,
                                 "session_timeout_s": session_timeout,
                                 "expect_nodes": ",".join(expect_nodes) or None,
                                 "metrics_port": metrics_port}
    if session_timeout is not None:
        overrides["heartbeat_interval_s"] = min(StitchSettings.heartbeat_interval_s, session_timeout / 3)
    settings = load_section(StitchSettings, "stitch", config_file=config_file, **overrides)
    engine_config = load_section(EngineConfig, "engine", config_file=config_file)
    routes = load_section(RouteSettings, "routes", config_file=config_file)
    sampler = TraceSampler.from_env()
    wait_for_dependencies(kafka, redis_settings, settings.startup_wait_s)
    sink: SpanSink
    if out_file:
        sink = JsonLinesSink(out_file)
    else:
        from stitcher.otlp import OtlpSpanExporter  # the OTel SDK loads only when exporting
        sink = OtlpSpanExporter()
    logger.info("sampling: %s", sampler.describe())
    logger.info("span names: %s", routes.describe())
    if ignored := engine_config.describe_ignored():
        logger.info("ignored routes: %s", ignored)
    sink = sampled(routed(sink, routes), sampler)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    sys.argv = [sys.argv[0]]  # Faust's worker parses argv itself
    run_worker(kafka, redis_settings, settings, engine_config, sink, loglevel=level)
