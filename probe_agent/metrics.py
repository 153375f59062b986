"""Prometheus metrics of one agent, in a registry of its own (several agents can live in one
test process), served over HTTP only when a port is configured."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.codec import EVENT_KINDS
from weft.health import Check, HealthApp, always_ok
from weft.health import serve as serve_http


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.node = node

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, labelnames=("node", *extra), registry=registry)

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, labelnames=("node", *extra), registry=registry)

        self._events = counter("weft_agent_events", "events decoded from the kernel, by kind", "kind")
        self._kernel = counter("weft_agent_kernel_counter",
                               "kernel-side counters (ring-buffer output failures, full maps, ...)",
                               "probe", "counter")
        self._ring_lost = counter("weft_agent_ringbuf_lost",
                                  "records the kernel could not put in a ring buffer", "probe")
        self._map_fill = gauge("weft_agent_bpf_map_fill_ratio", "entries / max_entries of a BPF map",
                               "probe", "map")
        self._dropped = counter("weft_agent_dropped", "events or frames dropped, by reason", "reason")
        self.decode_errors = counter("weft_agent_decode_errors",
                                     "ring records that did not decode").labels(node)
        self.frames = counter("weft_agent_frames", "frames handed to the sink").labels(node)
        self.frames_delivered = counter("weft_agent_frames_delivered",
                                        "frames the sink confirmed").labels(node)
        self.produce_errors = counter("weft_agent_produce_errors",
                                      "Kafka delivery or produce errors").labels(node)
        self.spool_bytes = gauge("weft_agent_spool_bytes", "bytes waiting in the spool").labels(node)
        self.spool_frames = gauge("weft_agent_spool_frames", "frames waiting in the spool").labels(node)
        self.late_rounds = counter("weft_agent_late_rounds",
                                   "poll rounds that started over 250 ms late: the agent was not "
                                   "scheduled (CPU starved), and its rings filled meanwhile").labels(node)
        self.process_cache = gauge("weft_agent_process_cache_entries",
                                   "enrichment cache size").labels(node)
        self._kernel_seen: dict[tuple[str, str], int] = {}
        self._event_children = {k: self._events.labels(node, k) for k in EVENT_KINDS}

    def count_event(self, kind: str, n: int = 1) -> None:
        child = self._event_children.get(kind)
        if child is not None:
            child.inc(n)

    def drop(self, reason: str, n: int = 1) -> None:
        self._dropped.labels(self.node, reason).inc(n)

    def kernel_counters(self, probe: str, totals: dict[str, int]) -> int:
        """Record a probe's cumulative kernel counters; returns how many records were newly lost."""
        newly_lost = 0
        for name, total in totals.items():
            before = self._kernel_seen.get((probe, name), 0)
            delta = max(0, total - before)
            self._kernel_seen[(probe, name)] = total
            if delta:
                self._kernel.labels(self.node, probe, name).inc(delta)
                if "lost" in name or "ring" in name:  # e.g. "ring_full"
                    newly_lost += delta
        if newly_lost:
            self._ring_lost.labels(self.node, probe).inc(newly_lost)
        return newly_lost

    def map_fill(self, probe: str, table: str, ratio: float) -> None:
        self._map_fill.labels(self.node, probe, table).set(ratio)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests and the bench read metrics through this)."""
        got = self.registry.get_sample_value(name, {"node": self.node, **labels})
        return float(got or 0.0)

    def serve(self, port: int, addr: str = "127.0.0.1", live: Check = always_ok) -> int:
        """/metrics, and /healthz and /readyz (both `live`: an agent has nothing to wait for
        once its programs are attached), from a daemon thread; returns the port."""
        return serve_http(HealthApp(self.registry, live, live), port, addr)
