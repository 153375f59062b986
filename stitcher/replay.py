"""`weft replay`: re-stitch a raw topic from offset 0 into a file or OTLP, with the in-memory
store (default) or Redis (in a namespace of its own, so the live state is never touched).

Reads with confluent-kafka (a batch loop is ~10x faster than Faust here) under a fresh consumer
group that commits nothing, up to the end offsets seen at start. Two passes: the first learns
the node names (message keys) so the engine waits for every node from the start; the second
merges the partitions by the frames' end time, as `weft rebuild` merges capture files, so
the replay decides exactly what the live stitcher and the rebuild decide. Undecodable frames
are counted and skipped (the live stitcher already dead-lettered them).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas import weft_events_pb2 as pb
from schemas.codec import CodecError, decode_frame
from stitcher.app import FrameStitcher, StitchSettings, Where, wait_for_dependencies
from stitcher.engine import Engine, EngineConfig, StateStore
from stitcher.routes import RouteSettings, routed
from stitcher.sampling import sampled
from stitcher.sinks import JsonLinesSink, SpanSink
from stitcher.state_memory import MemoryStateStore
from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section
from weft.logs import librdkafka_logger
from weft.sampling import TraceSampler

logger = logging.getLogger(__name__)

_BATCH = 1000
_MAX_BUFFERED = 20_000  # per partition; a partition further ahead in time is paused


@dataclass
class ReplayResult:
    frames: int
    events: int
    spans: int
    undecodable: int
    seconds: float


class _TopicReader:
    """All records of a topic up to its end as first reached, without committing.

    The end of a partition is the first PARTITION_EOF the fetcher reports (Tansu answers
    ListOffsets for the high watermark wrongly, so `get_watermark_offsets` is not used)."""

    def __init__(self, kafka: KafkaSettings, topic: str, stall_s: float = 60.0) -> None:
        self._consumer = Consumer({**kafka.confluent(), "group.id": f"weft-replay-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "enable.partition.eof": True, "logger": librdkafka_logger()})
        self._bootstrap = kafka.bootstrap
        self._stall_s = stall_s
        self._progress_at = time.monotonic()
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise click.ClickException(f"topic {topic!r} not found on {kafka.bootstrap}")
        self.topic = topic
        self.partitions = sorted(meta.partitions)
        self.ends: dict[int, int] = {}

    def rewind(self) -> None:
        """Start (again) from the oldest record of every partition."""
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self.partitions])
        self.ends = {}
        self._progress_at = time.monotonic()

    def batch(self) -> list[Any]:
        """The next records (each partition's end noted as it is reached). A broker that sends
        nothing, not even a partition's end, for `stall_s` ends the replay with one sentence: the
        consumer would otherwise wait for it forever."""
        msgs = self._consumer.consume(_BATCH, timeout=1.0)
        now = time.monotonic()
        if msgs:
            self._progress_at = now
        elif now - self._progress_at > self._stall_s:
            raise click.ClickException(
                f"reading {self.topic}: nothing from {self._bootstrap} for {self._stall_s:.0f} s with "
                f"{len(self.partitions) - len(self.ends)} of {len(self.partitions)} partitions unread to "
                "their end; is the broker still reachable? The replay is incomplete")
        out = []
        for msg in msgs:
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise click.ClickException(f"reading {self.topic}: {err}")
                self.ends.setdefault(partition, offset)
                continue
            if partition not in self.ends or offset < self.ends[partition]:
                out.append(msg)
        return out

    @property
    def done(self) -> set[int]:
        return set(self.ends)

    def finished(self) -> bool:
        return len(self.ends) == len(self.partitions)

    def pause(self, partition: int) -> None:
        self._consumer.pause([TopicPartition(self.topic, partition)])

    def resume(self, partition: int) -> None:
        self._consumer.resume([TopicPartition(self.topic, partition)])

    def close(self) -> None:
        self._consumer.close()


def scan_nodes(reader: _TopicReader) -> set[str]:
    """Pass 1: the nodes that published to the topic. Frames are keyed by node, so only the
    first valid frame of each key is decoded (a stray key of garbage names no node)."""
    reader.rewind()
    nodes: set[str] = set()
    confirmed: set[bytes] = set()
    while not reader.finished():
        for msg in reader.batch():
            key = msg.key() or b""
            if key and key in confirmed:
                continue
            try:
                nodes.add(decode_frame(msg.value() or b"").node)
            except CodecError:
                continue
            if key:
                confirmed.add(key)
    return nodes


def merged_frames(reader: _TopicReader, counter: list[int]) -> Iterator[tuple[pb.Frame, bytes, Where]]:
    """Pass 2: frames of all partitions, each partition in order, merged by frame end time."""
    reader.rewind()
    buffers: dict[int, deque[tuple[pb.Frame, bytes, Where]]] = {p: deque() for p in reader.partitions}
    paused: set[int] = set()
    heap: list[tuple[int, int, int]] = []  # (t_max, partition, offset) of each partition's head
    while True:
        # Fill until every unfinished partition has a head to compare (or is finished).
        while any(not buffers[p] and p not in reader.done for p in buffers) and not reader.finished():
            for msg in reader.batch():
                p = msg.partition()
                where = Where(reader.topic, p, msg.offset())
                value = msg.value() or b""
                try:
                    frame = decode_frame(value, str(where))
                except CodecError as exc:
                    counter[0] += 1
                    logger.warning("skipping undecodable %s: %s", where, exc.reason)
                    continue
                if not buffers[p]:
                    heapq.heappush(heap, (frame.t_max_ns, p, msg.offset()))
                buffers[p].append((frame, value, where))
                if len(buffers[p]) > _MAX_BUFFERED and p not in paused:
                    reader.pause(p)
                    paused.add(p)
        if not heap:
            return
        _, p, _ = heapq.heappop(heap)
        yield buffers[p].popleft()
        if buffers[p]:
            head = buffers[p][0]
            heapq.heappush(heap, (head[0].t_max_ns, p, head[2].offset))
        elif p in paused:
            reader.resume(p)
            paused.discard(p)


def replay(kafka: KafkaSettings, topic: str, store: StateStore, sink: SpanSink,
           engine_config: EngineConfig | None = None, stall_s: float = 60.0) -> ReplayResult:
    """Re-stitch `topic` from offset 0 into `sink`; flushes the engine and the sink at the end."""
    t0 = time.monotonic()
    reader = _TopicReader(kafka, topic, stall_s)
    try:
        engine = Engine(store, engine_config)
        engine.expect_nodes(scan_nodes(reader))
        stitcher = FrameStitcher(engine, sink, dead_letters=None, lease=None)
        undecodable = [0]
        for frame, value, where in merged_frames(reader, undecodable):
            stitcher.apply_blocking(frame, value, where)
        rest = stitcher.engine.flush()
        sink.export(rest)
    finally:
        reader.close()
    sink.force_flush()
    c = stitcher.counters
    return ReplayResult(c.frames, c.events, c.spans + len(rest), undecodable[0], time.monotonic() - t0)


@click.command("replay")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap)")
@click.option("--topic", help="raw frame topic (default kafka.raw_topic)")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="write OTLP JSON lines here")
@click.option("--otlp", is_flag=True, help="export over OTLP (OTEL_EXPORTER_OTLP_* variables)")
@click.option("--store", type=click.Choice(["memory", "redis"]), default="memory", show_default=True,
              help="join state: in memory, or in Redis under --namespace")
@click.option("--redis-url", help="Redis URL (overrides redis.url)")
@click.option("--namespace", default=None, help="Redis key prefix (default: replay-<random>:)")
@click.option("--stall-timeout", "stall_s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="give up when the broker sends nothing for this many seconds")
def replay_command(config_file: str | None, bootstrap: str | None, topic: str | None,
                   out_file: str | None, otlp: bool, store: str, redis_url: str | None,
                   namespace: str | None, stall_s: float) -> None:
    """Re-stitch a raw topic from the beginning (a fresh consumer group; nothing is committed)."""
    if bool(out_file) == otlp:
        raise click.UsageError("give exactly one of --out FILE or --otlp")
    kafka = load_section(KafkaSettings, "kafka", config_file=config_file, bootstrap=bootstrap)
    engine_config = load_section(EngineConfig, "engine", config_file=config_file)
    routes = load_section(RouteSettings, "routes", config_file=config_file)
    sampler = TraceSampler.from_env()
    redis_settings = (load_section(RedisSettings, "redis", config_file=config_file, url=redis_url)
                      if store == "redis" else None)
    wait_for_dependencies(kafka, redis_settings, wait_s=0)   # a batch job: ask once
    state: StateStore
    if redis_settings is not None:
        from stitcher.state_redis import RedisStateStore

        ns = namespace if namespace is not None else f"replay-{uuid.uuid4().hex[:8]}:"
        if not ns:
            raise ConfigError("--namespace must not be empty: a replay never writes the live keys")
        cluster = load_section(StitchSettings, "stitch", config_file=config_file).cluster  # as `weft stitch`
        state = RedisStateStore(redis_settings, namespace=ns, cluster=cluster)
        click.echo(f"replay state in Redis under namespace {ns!r}", err=True)
    else:
        state = MemoryStateStore()
    sink: SpanSink
    if out_file:
        sink = JsonLinesSink(out_file)
    else:
        from stitcher.otlp import OtlpSpanExporter

        sink = OtlpSpanExporter()
    if not sampler.keeps_all:
        click.echo(f"sampling: {sampler.describe()}", err=True)
    if routes.renames:
        click.echo(f"span names: {routes.describe()}", err=True)
    if ignored := engine_config.describe_ignored():
        click.echo(f"ignored routes: {ignored}", err=True)
    sink = sampled(routed(sink, routes), sampler)
    try:
        result = replay(kafka, topic or kafka.raw_topic, state, sink, engine_config, stall_s)
    finally:
        sink.shutdown()
        state.close()
    click.echo(f"replayed {result.frames} frames, {result.events} events → {result.spans} spans in "
               f"{result.seconds:.1f} s ({result.events / max(result.seconds, 1e-9):,.0f} events/s); "
               f"{result.undecodable} undecodable frames skipped")
    if sink.stats.sampled_out:
        click.echo(f"the sampler left out {sink.stats.sampled_out} of the {result.spans} spans")
