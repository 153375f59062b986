"""Span → OTLP conversion (shared by the exporter and rebuild's JSON) and `weft rebuild --otlp`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from stitcher.engine.model import Resource, Span
from stitcher.otlp_convert import (
    read_json_spans,
    request_from_json,
    request_to_json,
    spans_to_json_line,
    spans_to_request,
)
from tests.otlp_receiver import OtlpReceiver
from weft.cli import cli

RES = Resource("checkout", "node-a", 42, "python3")
SPAN = Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), parent_span_id=bytes(range(8, 16)),
            kind="SERVER", name="GET /pay", start_ns=1_760_000_000_000_000_000,
            end_ns=1_760_000_000_005_000_000, attributes=(("http.request.method", "GET"),
                                                          ("http.response.status_code", 502),
                                                          ("weft.late", True)),
            resource=RES, error=True)


def test_json_line_uses_hex_ids_and_round_trips() -> None:
    line = spans_to_json_line([SPAN])
    doc = json.loads(line)
    sp = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert sp["traceId"] == bytes(range(16)).hex() and sp["spanId"] == bytes(range(8)).hex()
    assert sp["parentSpanId"] == bytes(range(8, 16)).hex()
    assert sp["kind"] == "SPAN_KIND_SERVER" and sp["status"]["code"] == "STATUS_CODE_ERROR"
    assert sp["startTimeUnixNano"] == str(SPAN.start_ns)       # protobuf JSON: 64-bit ints as strings
    assert request_from_json(line) == spans_to_request([SPAN])
    back = next(read_json_spans([line]))
    assert (back.service, back.node, back.kind) == ("checkout", "node-a", "SERVER")
    assert back.attributes == {"http.request.method": "GET", "http.response.status_code": 502,
                               "weft.late": True}


_text = st.text(max_size=12)   # any unicode, incl. quotes, controls, non-ASCII
_attr_value = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), _text)
_resources = st.builds(Resource, _text, _text, st.integers(0, 2**31), _text)
_spans = st.builds(
    Span, trace_id=st.binary(min_size=16, max_size=16), span_id=st.binary(min_size=8, max_size=8),
    parent_span_id=st.one_of(st.just(b""), st.binary(min_size=8, max_size=8)),
    kind=st.sampled_from(["SERVER", "CLIENT"]), name=_text, start_ns=st.integers(0, 2**64 - 1),
    end_ns=st.integers(0, 2**64 - 1),
    attributes=st.lists(st.tuples(_text, _attr_value), max_size=6).map(tuple),
    resource=st.one_of(st.just(RES), _resources), error=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(_spans, max_size=6))
def test_direct_json_line_is_byte_identical_to_the_protobuf_json_mapping(spans: list[Span]) -> None:
    # rebuild writes lines directly; the protobuf mapping is the reference it must equal
    assert spans_to_json_line(spans) == request_to_json(spans_to_request(spans))


def _sdk_flags() -> dict[tuple[str, bool], int]:
    """The OTLP flags the OpenTelemetry SDK's own encoder writes for the spans Weft exports: a
    server span under a context extracted from a caller's headers, a client span under it, and
    both without a parent. Keyed by (kind, has parent)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = TracerProvider().get_tracer("t")
    caller = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01"})
    with tracer.start_as_current_span("s", context=caller, kind=SpanKind.SERVER) as server, \
            tracer.start_as_current_span("c", kind=SpanKind.CLIENT) as client:
        pass
    with tracer.start_span("r", kind=SpanKind.SERVER) as root, \
            tracer.start_span("o", kind=SpanKind.CLIENT) as lone:
        pass
    spans = {("SERVER", True): server, ("CLIENT", True): client, ("SERVER", False): root,
             ("CLIENT", False): lone}
    out = {}
    for key, span in spans.items():
        encoded = encode_spans([span])  # type: ignore[list-item]
        out[key] = encoded.resource_spans[0].scope_spans[0].spans[0].flags
    return out


def test_span_flags_say_whether_the_parent_is_remote_as_the_sdk_does() -> None:
    # bits 8-9 (is-remote known, is remote) as the SDK encodes them; bit 0: sampled (the SDK
    # leaves bits 0-7 at 0, the spec recommends the W3C trace flags there)
    for (kind, has_parent), sdk in _sdk_flags().items():
        span = SPAN._replace(kind=kind, parent_span_id=SPAN.parent_span_id if has_parent else b"")
        line = json.loads(spans_to_json_line([span]))
        flags = line["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["flags"]
        assert flags == spans_to_request([span]).resource_spans[0].scope_spans[0].spans[0].flags
        assert flags == sdk | 0x01, (kind, has_parent)
    assert _sdk_flags()[("SERVER", True)] == 0x300      # the reference does tell them apart


def test_resource_groups_spans_once() -> None:
    other = SPAN._replace(span_id=b"\x01" * 8)
    request = spans_to_request([SPAN, other])
    assert len(request.resource_spans) == 1
    attrs = {kv.key: kv.value for kv in request.resource_spans[0].resource.attributes}
    assert attrs["service.name"].string_value == "checkout" and attrs["process.pid"].int_value == 42


def test_rebuild_otlp_sends_every_span_to_a_real_receiver(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["simulate", "--nodes", "2", "--rps", "5", "--seconds", "1",
                               "--capture-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        done = runner.invoke(cli, ["rebuild", *map(str, tmp_path.glob("*.wcap")), "--otlp"])
        assert done.exit_code == 0, done.output
        got = rx.wait_for(len(rows), timeout=30)
    assert {s.span_id.hex(): s.parent_span_id.hex() for s in got} == {r["span"]: r["parent"] for r in rows}
