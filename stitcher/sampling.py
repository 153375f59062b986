"""Which traces a stitcher exports: the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.

Weft decides per trace, by trace id, at export. The join still sees every event, so a kept trace
is whole, and the raw events stay in Kafka and in capture files: `weft rebuild` (which does not
sample) gives back any trace a stitcher left out. Trace ids are functions of the events, so every
worker, a replay and a restarted worker make the same decision for every span of a trace, whenever
each span is finished.

The ratio test is the OpenTelemetry Python SDK's `TraceIdRatioBased`: keep when the trace id's
low 64 bits are below ratio × 2^64. A service instrumented with that SDK at the same ratio keeps
the same traces.

The `parentbased_*` samplers are read as their root sampler. Weft does not read the sampled flag
of a traceparent it did not inject, so a caller's "not sampled" does not drop a trace here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stitcher.engine.model import Span
from stitcher.sinks import ExportStats, SpanSink
from weft.config import ConfigError

_RATIO_OF = {"always_on": 1.0, "parentbased_always_on": 1.0,
             "always_off": 0.0, "parentbased_always_off": 0.0}
_BY_ARG = ("traceidratio", "parentbased_traceidratio")
SAMPLERS = (*_RATIO_OF, *_BY_ARG)
_LOW_64 = (1 << 64) - 1


@dataclass(frozen=True)
class TraceSampler:
    """Keeps a trace when its id's low 64 bits are below `ratio` × 2^64."""

    ratio: float = 1.0
    name: str = "always_on"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={self.ratio}: a ratio from 0 to 1")

    @property
    def bound(self) -> int:
        return round(self.ratio * (_LOW_64 + 1))

    @property
    def keeps_all(self) -> bool:
        return self.bound > _LOW_64

    def keeps(self, trace_id: bytes) -> bool:
        return int.from_bytes(trace_id[8:16], "big") < self.bound

    def describe(self) -> str:
        if self.keeps_all:
            return f"{self.name}: every trace exported"
        if self.ratio == 0.0:
            return f"{self.name}: no trace exported (the join goes on; `weft rebuild` recovers them)"
        return (f"{self.name} {self.ratio:g}: traces exported by trace id, about {self.ratio:.2%} of "
                "them (the join sees all; `weft rebuild` recovers the rest)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TraceSampler:
        """The sampler `OTEL_TRACES_SAMPLER` names (default `parentbased_always_on`: keep all)."""
        env = os.environ if environ is None else environ
        name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if name in _RATIO_OF:
            return cls(_RATIO_OF[name], name)
        if name not in _BY_ARG:
            raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r}: Weft samples by trace id; allowed: "
                              f"{', '.join(SAMPLERS)}")
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(raw) if raw else 1.0        # the spec's default for a missing ratio
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: a ratio from 0 to 1, "
                              "e.g. 0.1") from None
        return cls(ratio, name)


class SampledSink:
    """A sink that passes on the spans of the traces `sampler` keeps and counts the rest."""

    def __init__(self, inner: SpanSink, sampler: TraceSampler) -> None:
        self.inner = inner
        self.sampler = sampler
        self.stats: ExportStats = inner.stats     # the same counters: one set per worker

    def export(self, spans: Sequence[Span]) -> None:
        kept = [s for s in spans if self.sampler.keeps(s.trace_id)]
        self.stats.sampled_out += len(spans) - len(kept)
        self.inner.export(kept)

    def queued(self) -> int:
        return self.inner.queued()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return self.inner.force_flush(timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.inner.shutdown(timeout_s)


def sampled(sink: SpanSink, sampler: TraceSampler) -> SpanSink:
    """`sink` itself when the sampler keeps every trace, else `sink` behind the sampler."""
    return sink if sampler.keeps_all else SampledSink(sink, sampler)
