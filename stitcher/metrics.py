"""Prometheus metrics of one `weft stitch` worker, in a registry of its own.

Nothing here runs per event: a scrape reads the counters the worker keeps anyway (its
FrameStitcher's, the engine's, the sink's and the consumer's lag), so the metrics cost the
stream nothing. Counters are this worker's since it started; sum them over the workers of a
group. The event-time gauges answer the first question about a stream processor — how far
behind is it? — per node: a node whose watermark stops moving is an agent that stopped
sending (or a partition nobody reads), and `weft_stitch_event_time_lag_seconds` is how long
a finished request waits, at least, before its span can be decided.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stitcher.consumer_lag import ConsumerLag
from stitcher.engine import Engine
from stitcher.sinks import SpanSink
from weft.health import Check, HealthApp, always_ok
from weft.health import serve as serve_http

if TYPE_CHECKING:  # the worker module imports this one
    from stitcher.app import FrameStitcher, StitchCounters

# EngineStats field → (metric name, help). Counters of what the join decided or refused.
_ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "http": ("weft_stitch_requests", "HTTP request events taken into the join (duplicates excluded)"),
    "duplicates": ("weft_stitch_duplicates", "HTTP request events seen before (a redelivered frame)"),
    "invalid": ("weft_stitch_invalid", "HTTP request events refused as invalid (also dead-lettered)"),
    "late": ("weft_stitch_late",
             "requests that arrived after their decision time: exported unlinked, weft.late=true"),
    "ambiguous": ("weft_stitch_ambiguous", "spans with more than one candidate parent: left unlinked"),
    "trace_splits": ("weft_stitch_trace_splits",
                     "spans that started a new trace because the parent's was too deep or too long"),
    "lost_requests": ("weft_stitch_lost_requests",
                      "requests the agent could not capture (ring buffer full), known by a marker"),
    "parent_lost": ("weft_stitch_parent_lost",
                    "spans whose parent was a request the agent lost: unlinked, weft.parent_lost"),
    "blind": ("weft_stitch_records_lost",
              "in-process links refused because the agent lost records then: weft.records_lost"),
    "go_unlinked": ("weft_stitch_go_unlinked", "Go calls without a goroutine id: never linked by thread"),
    "trace_mismatch": ("weft_stitch_trace_mismatch",
                       "spans whose injected trace id differs from their parent's"),
    "unresolved": ("weft_stitch_unresolved", "spans cut loose from a parent cycle at the end of input"),
    "ignored": ("weft_stitch_ignored_spans",
                "spans not exported: their trace began with a request to engine.ignore_routes"),
}


class StitchCollector(Collector):
    """Reads one worker's state at scrape time, in the HTTP server's thread: plain reads of
    numbers, and dicts copied in one C call (`dict(x)`, atomic under the GIL) before iterating,
    as the worker may add a key meanwhile."""

    def __init__(self, stitcher: FrameStitcher, lag: ConsumerLag | None = None) -> None:
        self._stitcher = stitcher
        self._lag = lag

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        st = self._stitcher
        yield from _stream_counters(st.counters)
        yield from _engine_metrics(st.engine)     # read each time: a failed batch swaps the engine
        yield from _export_metrics(st.sink)
        yield GaugeMetricFamily("weft_stitch_unacknowledged_spans",
                                "spans handed to the exporter, not yet confirmed flushed (kept in "
                                "the outbox: a restarted worker exports them again)",
                                value=st.unacknowledged_count())
        yield GaugeMetricFamily("weft_stitch_lease_held", "1 while this worker holds the frame lease",
                                value=int(st.lease is not None and st.lease.held))
        if self._lag is not None:
            yield from _consumer_metrics(self._lag)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _stream_counters(c: StitchCounters) -> Iterator[CounterMetricFamily]:
    yield _counter("weft_stitch_frames", "frames stitched", c.frames)
    yield _counter("weft_stitch_events", "events in those frames", c.events)
    yield _counter("weft_stitch_spans", "spans decided and handed to the exporter", c.spans)
    yield _counter("weft_stitch_batches", "batches of frames run through the engine", c.batches)
    yield _counter("weft_stitch_engine_seconds",
                   "seconds in the join engine, state-store round trips included (its rate is the "
                   "share of the worker's time spent joining)", c.engine_seconds)
    yield _counter("weft_stitch_store_retries", "state-store failures retried", c.store_retries)
    yield _counter("weft_stitch_lease_waits",
                   "batches that waited because another worker held the frame lease", c.lease_waits)
    dead = CounterMetricFamily("weft_stitch_dead_letters",
                               "frames or events sent to the dead-letter topic, by kind of reason",
                               labels=("reason",))
    for kind, n in sorted(dict(c.dead_letter_kinds).items()):
        dead.add_metric((kind,), n)
    yield dead


def _engine_metrics(engine: Engine) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    stats = engine.stats
    links = CounterMetricFamily("weft_stitch_links", "spans decided, by how their parent was found "
                                "(root and orphan: no parent)", labels=("link",))
    for link, n in sorted(dict(stats.links).items()):
        links.add_metric((link,), n)
    yield links
    for field_name, (name, doc) in _ENGINE_COUNTERS.items():
        yield _counter(name, doc, getattr(stats, field_name))
    yield GaugeMetricFamily("weft_stitch_nodes_timed_out",
                            "nodes whose watermark lags the newest by more than engine.node_timeout_s "
                            "(no longer waited for)", value=stats.nodes_timed_out)
    yield GaugeMetricFamily("weft_stitch_node_timeouts_held",
                            "1 while node timeouts are held because this worker has unread messages",
                            value=int(engine.hold_node_timeouts))
    marks = GaugeMetricFamily("weft_stitch_node_watermark_seconds",
                              "each node's newest watermark (event time, Unix seconds) as of this "
                              "worker's last batch; 0 for an expected node not heard from yet",
                              labels=("node",))
    for node, ns in sorted(engine.node_watermarks().items()):
        marks.add_metric((node,), ns / 1e9)
    yield marks
    low = engine.low_watermark_ns
    if low:
        yield GaugeMetricFamily("weft_stitch_low_watermark_seconds",
                                "event time (Unix seconds) up to which every waited-for node has "
                                "reported: the stitcher's decisions are final up to here", value=low / 1e9)
        yield GaugeMetricFamily("weft_stitch_event_time_lag_seconds",
                                "wall clock minus the low watermark: how far the stitcher's "
                                "decisions trail real time", value=time.time() - low / 1e9)


def _export_metrics(sink: SpanSink) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    s = sink.stats
    spans = CounterMetricFamily("weft_stitch_export_spans",
                                "spans by export outcome: exported (confirmed by the receiver), failed "
                                "(given up after retries), dropped (export queue stayed full), "
                                "sampled_out (trace left out by OTEL_TRACES_SAMPLER)",
                                labels=("result",))
    spans.add_metric(("exported",), s.exported)
    spans.add_metric(("failed",), s.failed)
    spans.add_metric(("dropped",), s.dropped)
    spans.add_metric(("sampled_out",), s.sampled_out)
    yield spans
    yield _counter("weft_stitch_export_batches", "export requests that succeeded", s.batches)
    yield GaugeMetricFamily("weft_stitch_export_queue_spans", "spans waiting to be exported",
                            value=sink.queued())


def _consumer_metrics(lag: ConsumerLag) -> Iterator[GaugeMetricFamily]:
    gauge = GaugeMetricFamily("weft_stitch_consumer_lag_messages",
                              "messages on the partition after the one being processed, as of the "
                              "last fetch", labels=("partition",))
    for partition, n in sorted(lag.per_partition().items()):
        gauge.add_metric((str(partition),), n)
    yield gauge


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1", *,
          live: Check = always_ok, ready: Check = always_ok) -> int:
    """Serve `registry` over HTTP, with /healthz and /readyz (a daemon thread); returns the port
    (given 0: the one chosen)."""
    return serve_http(HealthApp(registry, live, ready), port, addr)
