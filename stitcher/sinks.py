"""Where a stitcher's spans go: the sink interface, its counters, and the OTLP JSON lines file.

The OTLP exporter (stitcher/otlp.py) is the other sink; it lives apart because it loads the
OpenTelemetry SDK, which a worker writing a file never needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stitcher.engine.model import Span
from stitcher.otlp_convert import spans_to_json_line


@dataclass
class ExportStats:
    exported: int = 0
    failed: int = 0     # spans in batches the exporter gave up on after its retries
    dropped: int = 0    # spans refused because the queue stayed full
    sampled_out: int = 0  # spans of traces the sampler left out (stitcher.sampling)
    batches: int = 0
    last_export_monotonic: float = 0.0


class SpanSink(Protocol):
    stats: ExportStats

    def export(self, spans: Sequence[Span]) -> None: ...
    def queued(self) -> int: ...
    def force_flush(self, timeout_s: float = 30.0) -> bool: ...
    def shutdown(self, timeout_s: float = 30.0) -> None: ...


class ForwardingSink:
    """A stage in front of another sink (sampling, route names): it shares the inner sink's
    counters and passes flush and shutdown on; subclasses change what `export` hands over."""

    def __init__(self, inner: SpanSink) -> None:
        self.inner = inner
        self.stats: ExportStats = inner.stats     # the same counters: one set per worker

    def export(self, spans: Sequence[Span]) -> None:
        self.inner.export(spans)

    def queued(self) -> int:
        return self.inner.queued()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return self.inner.force_flush(timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.inner.shutdown(timeout_s)


class JsonLinesSink:
    """Spans as OTLP JSON lines (one ExportTraceServiceRequest per non-empty batch)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()
        self.stats = ExportStats()

    def export(self, spans: Sequence[Span]) -> None:
        if spans:
            self._fh.write(spans_to_json_line(spans) + "\n")
            self.stats.exported += len(spans)
            self.stats.batches += 1

    def queued(self) -> int:
        return 0     # written at once (the file's buffer is flushed by force_flush)

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        self._fh.flush()
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if not self._fh.closed:
            self._fh.close()
