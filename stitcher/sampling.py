"""Which traces a stitcher exports (`OTEL_TRACES_SAMPLER`, see weft.sampling): a sink in front
of the exporter that passes the spans of the traces the sampler keeps.

Weft decides per trace at export: by trace id, or, for a trace that came in from outside under a
`parentbased_*` sampler (the default), by its caller's sampled flag, which every span of it
carries. The join still sees every event, so a kept trace is whole, and the raw events stay in
Kafka and in capture files: `weft rebuild` (which does not sample) gives back any trace a
stitcher left out. Trace ids and flags are functions of the events, so every worker, a replay and
a restarted worker make the same decision for every span of a trace, whenever each span is
finished.
"""

from __future__ import annotations

from collections.abc import Sequence

from stitcher.engine.model import Span
from stitcher.sinks import ForwardingSink, SpanSink
from weft.sampling import TraceSampler


class SampledSink(ForwardingSink):
    """A sink that passes on the spans of the traces `sampler` keeps and counts the rest."""

    def __init__(self, inner: SpanSink, sampler: TraceSampler) -> None:
        super().__init__(inner)
        self.sampler = sampler

    def export(self, spans: Sequence[Span]) -> None:
        keeps = self.sampler.keeps_span
        kept = [s for s in spans if keeps(s)]
        self.stats.sampled_out += len(spans) - len(kept)
        self.inner.export(kept)


def sampled(sink: SpanSink, sampler: TraceSampler) -> SpanSink:
    """`sink` itself when the sampler keeps every trace, else `sink` behind the sampler."""
    return sink if sampler.keeps_all else SampledSink(sink, sampler)
