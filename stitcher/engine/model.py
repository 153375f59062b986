"""What the join engine produces: spans with deterministic IDs, and the process they came from.

These are plain immutable values (named tuples: built and hashed in C, as a rebuild makes one
per request and groups them by resource); the OTLP conversion lives in `stitcher.otlp_convert`
and the engine never imports OpenTelemetry. Attribute names follow the OpenTelemetry HTTP semantic
conventions; `weft.link` says which hop type gave the span its parent.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

SpanKind = Literal["SERVER", "CLIENT"]
AttrValue = str | int | bool

LINK_TYPES: tuple[str, ...] = (
    "thread",          # same thread (or same goroutine) served the request that made the call
    "spawned_thread",  # an ancestor thread by clone lineage served it
    "goroutine",       # an ancestor goroutine by `go` lineage served it
    "cross_node",      # server ← client by TCP seq + fingerprint, tuples agree
    "nat",             # server ← client by TCP seq + fingerprint, tuples differ (NAT)
    "tuple",           # server ← client by connection tuple + time containment (no seq)
    "traceparent",     # incoming W3C traceparent named the parent
    "root",            # no parent exists (entry point)
    "orphan",          # a parent was looked for and none (or several: ambiguous) qualified
)


class Resource(NamedTuple):
    """One traced process on one node (OTel resource: service.name, host.name, process.*, and
    what the process brings itself: schemas/resource.py)."""

    service_name: str
    node: str
    pid: int
    exe: str
    attrs: tuple[tuple[str, str], ...] = ()   # sorted by key, none of the keys above

    def attributes(self) -> tuple[tuple[str, AttrValue], ...]:
        return (("service.name", self.service_name), ("host.name", self.node),
                ("process.pid", self.pid), ("process.executable.name", self.exe), *self.attrs)


class Span(NamedTuple):
    """One HTTP request seen from one side. IDs are raw bytes; hex them only at the edges."""

    trace_id: bytes          # 16 bytes
    span_id: bytes           # 8 bytes
    parent_span_id: bytes    # 8 bytes, b"" for a root
    kind: SpanKind
    name: str                # "GET /path"
    start_ns: int
    end_ns: int
    attributes: tuple[tuple[str, AttrValue], ...]
    resource: Resource
    error: bool              # status Error: 5xx, 4xx of a client, or no response (core._failed)
    # the sampled flag of the traceparent that brought this span's trace in from outside Weft;
    # None when the trace started here (what a parent-based sampler decides by: weft.sampling)
    remote_sampled: bool | None = None

    def attr(self, key: str, default: AttrValue | None = None) -> AttrValue | None:
        for k, v in self.attributes:
            if k == key:
                return v
        return default

    @property
    def link(self) -> str:
        return str(self.attr("weft.link", ""))

    def sort_key(self) -> tuple[bytes, int, bytes]:
        """Canonical output order: by trace, then start, then span id."""
        return (self.trace_id, self.start_ns, self.span_id)
