"""Exported spans against the offline answer: what is missing, what was exported twice and differs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

from stitcher.engine import Span
from stitcher.otlp_convert import span_to_proto


@dataclass(frozen=True)
class ExportCheck:
    expected: int          # spans of the offline rebuild
    received: int          # span copies the receiver got (duplicates included)
    missing: int           # expected span ids never received
    wrong: int             # expected span ids received, but no copy equals the rebuild's
    extra: int             # received span ids the rebuild does not have
    duplicated: int        # span ids received more than once
    duplicates_differ: int  # span ids received more than once with different contents

    @property
    def exact(self) -> bool:
        return not (self.missing or self.wrong or self.extra or self.duplicates_differ)


def received_spans(requests: Iterable[ExportTraceServiceRequest]) -> list[trace_pb2.Span]:
    return [s for r in requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def check_export(expected: Iterable[Span], requests: Iterable[ExportTraceServiceRequest]) -> ExportCheck:
    """Compare by span id; contents as deterministic protobuf bytes of the span (IDs, parent,
    name, times, attributes, status; the resource travels beside it and is not compared)."""
    want = {s.span_id: span_to_proto(s).SerializeToString(deterministic=True) for s in expected}
    got: dict[bytes, list[bytes]] = defaultdict(list)
    received = 0
    for span in received_spans(requests):
        got[span.span_id].append(span.SerializeToString(deterministic=True))
        received += 1
    return ExportCheck(
        expected=len(want), received=received,
        missing=sum(1 for sid in want if sid not in got),
        wrong=sum(1 for sid, body in want.items() if sid in got and body not in got[sid]),
        extra=sum(1 for sid in got if sid not in want),
        duplicated=sum(1 for copies in got.values() if len(copies) > 1),
        duplicates_differ=sum(1 for copies in got.values() if len(set(copies)) > 1))
