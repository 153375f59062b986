"""Span → OTLP conversion (shared by the exporter and rebuild's JSON) and `weft rebuild --otlp`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from stitcher.engine.model import Resource, Span
from stitcher.otlp_convert import read_json_spans, request_from_json, spans_to_json_line, spans_to_request
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


def test_resource_groups_spans_once() -> None:
    other = Span(**{**{f: getattr(SPAN, f) for f in SPAN.__slots__}, "span_id": b"\x01" * 8})
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
