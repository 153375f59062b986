"""Span → OTLP protobuf, in one place: H2b's OTLP exporter and `weft rebuild`'s JSON writer both
use it, so streamed and rebuilt traces are the same messages.

JSON lines follow the Collector's file exporter: one ExportTraceServiceRequest per line, protobuf
JSON mapping with lowerCamelCase names, and (per the OTLP JSON spec) trace/span ids as hex
strings instead of protobuf JSON's base64.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from json.encoder import encode_basestring_ascii as _quote  # the C escaper json.dumps uses
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from stitcher.engine.model import AttrValue, Resource, Span

SCOPE_NAME = "weft.stitcher"
SCOPE_VERSION = "0.1.0"
_KIND = {"SERVER": PbSpan.SPAN_KIND_SERVER, "CLIENT": PbSpan.SPAN_KIND_CLIENT}
# OTLP span flags: the W3C sampled bit, and whether the parent is remote (bit 8: known, bit 9:
# remote). A server span's parent came over the wire (a client span in another process, or a
# caller's traceparent); a client span's parent is its own process's server span.
_FLAGS_LOCAL_PARENT = 0x100 | 0x01
_FLAGS_REMOTE_PARENT = 0x200 | 0x100 | 0x01


def span_flags(span: Span) -> int:
    return _FLAGS_REMOTE_PARENT if span.parent_span_id and span.kind == "SERVER" else _FLAGS_LOCAL_PARENT


def _value(v: AttrValue) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    return AnyValue(string_value=v)


@lru_cache(maxsize=65536)
def _kv(key: str, value: AttrValue, _is_bool: bool) -> KeyValue:
    """One attribute (whether it is a bool is part of the cache key: True == 1 in a dict).
    Attributes repeat heavily (methods, paths, peers, link types): building each message
    once and letting protobuf copy it is cheaper than building it again per span."""
    return KeyValue(key=key, value=_value(value))


def _attrs(pairs: Iterable[tuple[str, AttrValue]]) -> list[KeyValue]:
    return [_kv(k, v, v is True or v is False) for k, v in pairs]


def span_to_proto(span: Span) -> PbSpan:
    pb = PbSpan(trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id,
                name=span.name, kind=_KIND[span.kind], start_time_unix_nano=span.start_ns,
                end_time_unix_nano=span.end_ns, attributes=_attrs(span.attributes),
                flags=span_flags(span))
    if span.error:
        pb.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
    return pb


def spans_to_request(spans: Sequence[Span]) -> ExportTraceServiceRequest:
    """Group spans by resource (first-seen order) into one request."""
    by_resource: dict[Resource, list[Span]] = {}
    for span in spans:
        by_resource.setdefault(span.resource, []).append(span)
    request = ExportTraceServiceRequest()
    for resource, members in by_resource.items():
        rs = ResourceSpans(resource=PbResource(attributes=_attrs(resource.attributes())))
        rs.scope_spans.append(ScopeSpans(scope=InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION),
                                         spans=[span_to_proto(s) for s in members]))
        request.resource_spans.append(rs)
    return request


def _hex_ids(doc: dict[str, Any], request: ExportTraceServiceRequest) -> None:
    """protobuf JSON writes bytes as base64; OTLP JSON wants hex ids. Rewrite from the protos."""
    for rs_doc, rs in zip(doc.get("resourceSpans", []), request.resource_spans, strict=True):
        for ss_doc, ss in zip(rs_doc.get("scopeSpans", []), rs.scope_spans, strict=True):
            for sp_doc, sp in zip(ss_doc.get("spans", []), ss.spans, strict=True):
                sp_doc["traceId"] = sp.trace_id.hex()
                sp_doc["spanId"] = sp.span_id.hex()
                if sp.parent_span_id:
                    sp_doc["parentSpanId"] = sp.parent_span_id.hex()


def request_to_json(request: ExportTraceServiceRequest) -> str:
    """One OTLP JSON line (no trailing newline)."""
    doc = json_format.MessageToDict(request)
    _hex_ids(doc, request)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def spans_to_json_line(spans: Sequence[Span]) -> str:
    """One OTLP JSON line (no trailing newline) for `spans`, written directly: the same bytes
    as `request_to_json(spans_to_request(spans))` (protobuf JSON mapping, default values
    left out, sorted keys, hex ids; tests/unit/test_engine_otlp.py checks the identity) at a
    fraction of the cost, as `weft rebuild` writes every span this way."""
    by_resource: dict[Resource, list[str]] = {}
    for span in spans:
        by_resource.setdefault(span.resource, []).append(_span_json(span))
    if not by_resource:
        return "{}"
    parts = [f'{{"resource":{{{_attrs_json(r.attributes())}}},"scopeSpans":[{{"scope":{_SCOPE_JSON},'
             f'"spans":[{",".join(members)}]}}]}}' for r, members in by_resource.items()]
    return f'{{"resourceSpans":[{",".join(parts)}]}}'


_SCOPE_JSON = f'{{"name":{_quote(SCOPE_NAME)},"version":{_quote(SCOPE_VERSION)}}}'
_KIND_JSON = {"SERVER": '"kind":"SPAN_KIND_SERVER"', "CLIENT": '"kind":"SPAN_KIND_CLIENT"'}
_ERROR_JSON = ',"status":{"code":"STATUS_CODE_ERROR"}'
_kv_json_cache: dict[str, dict[AttrValue, str]] = {}   # key → value → JSON


def _kv_json(key: str, value: AttrValue) -> str:
    """One KeyValue object as protobuf JSON writes it (an empty key is a default: left out)."""
    if value is True or value is False:
        body = '{"boolValue":true}' if value else '{"boolValue":false}'
    elif isinstance(value, int):
        body = f'{{"intValue":"{value:d}"}}'
    else:
        body = f'{{"stringValue":{_quote(value)}}}'
    return f'{{"key":{_quote(key)},"value":{body}}}' if key else f'{{"value":{body}}}'


def _attrs_json(pairs: Iterable[tuple[str, AttrValue]]) -> str:
    """`"attributes":[...]`, or "" when there are none (an empty repeated field is left out).
    Attributes repeat heavily (methods, paths, peers, link types): each is built once, cached
    per key then per value (no tuple to build per attribute). Bools (weft.* flags, rare) are
    not cached: True == 1 as a dict key."""
    cache = _kv_json_cache
    out = []
    for k, v in pairs:
        if v is True or v is False:
            out.append(_kv_json(k, v))
            continue
        by_value = cache.get(k)
        if by_value is None:
            by_value = cache[k] = {}
        text = by_value.get(v)
        if text is None:
            if len(by_value) >= 65536:
                by_value.clear()
            text = by_value[v] = _kv_json(k, v)
        out.append(text)
    return f'"attributes":[{",".join(out)}]' if out else ""


def _span_json(span: Span) -> str:
    """One span object, its keys in sorted order, fields at their default left out. Built as
    one f-string of optional pieces ("" when left out): this runs once per span written."""
    trace_id, span_id, parent_span_id, kind, name, start_ns, end_ns, attributes, _, error, _ = span
    attrs = _attrs_json(attributes)
    head = f"{attrs}," if attrs else ""
    end = f'"endTimeUnixNano":"{end_ns:d}",' if end_ns else ""
    named = f',"name":{_quote(name)}' if name else ""
    parent = f',"parentSpanId":"{parent_span_id.hex()}"' if parent_span_id else ""
    own = f',"spanId":"{span_id.hex()}"' if span_id else ""
    start = f',"startTimeUnixNano":"{start_ns:d}"' if start_ns else ""
    status = _ERROR_JSON if error else ""
    trace = f',"traceId":"{trace_id.hex()}"' if trace_id else ""
    flags = span_flags(span)
    return f'{{{head}{end}"flags":{flags:d},{_KIND_JSON[kind]}{named}{parent}{own}{start}{status}{trace}}}'


def request_from_json(line: str) -> ExportTraceServiceRequest:
    """Parse one OTLP JSON line (hex ids) back into a request."""
    doc = json.loads(line)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if sp.get(key):
                        sp[key] = _b64(bytes.fromhex(sp[key]))
    request = ExportTraceServiceRequest()
    json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    return request


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class JsonSpan:
    """A span read back from OTLP JSON lines (what `weft show` and `weft verify` look at)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    service: str
    node: str
    attributes: dict[str, Any]
    error: bool = False      # span status Error (5xx, a client's 4xx, no response)
    resource: dict[str, Any] = field(default_factory=dict)   # every attribute of its resource


def _plain(value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    return None


def read_json_spans(lines: Iterable[str]) -> Iterator[JsonSpan]:
    """Spans of OTLP JSON lines (hex ids, as the Collector's file exporter writes them)."""
    for line in lines:
        if not line.strip():
            continue
        doc = json.loads(line)
        for rs in doc.get("resourceSpans", []):
            res = {a["key"]: _plain(a.get("value", {})) for a in rs.get("resource", {}).get("attributes", [])}
            for ss in rs.get("scopeSpans", []):
                for sp in ss.get("spans", []):
                    attrs = {a["key"]: _plain(a.get("value", {})) for a in sp.get("attributes", [])}
                    yield JsonSpan(sp.get("traceId", ""), sp.get("spanId", ""), sp.get("parentSpanId", ""),
                                   sp.get("name", ""), str(sp.get("kind", "")).removeprefix("SPAN_KIND_"),
                                   int(sp.get("startTimeUnixNano", 0)), int(sp.get("endTimeUnixNano", 0)),
                                   str(res.get("service.name", "")), str(res.get("host.name", "")), attrs,
                                   sp.get("status", {}).get("code") in ("STATUS_CODE_ERROR", 2), res)
