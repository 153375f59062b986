"""OtlpSpanExporter against real OTLP receivers (gRPC and HTTP/protobuf): exact ids and parents,
sampled flag, resources, batching, retry on transient failures, flush on shutdown, env config."""

from __future__ import annotations

import hashlib
import time

import pytest

from stitcher.engine.model import Resource, Span
from stitcher.otlp import OtlpSettings, OtlpSpanExporter
from tests.otlp_receiver import OtlpHttpReceiver, OtlpReceiver, ReceivedSpan
from weft.config import ConfigError

_RESOURCES = [Resource("frontend", "node-a", 101, "python3"), Resource("backend", "node-b", 202, "nginx")]


_T0 = 1_700_000_000_000_000_000


def _id(n: int, size: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=size).digest()


def _spans(n: int) -> list[Span]:
    """A chain of n spans alternating SERVER/CLIENT and two processes; span i's parent is i-1."""
    trace = _id(-1, 16)
    out = []
    for i in range(n):
        out.append(Span(trace_id=trace, span_id=_id(i, 8), parent_span_id=_id(i - 1, 8) if i else b"",
                        kind="SERVER" if i % 2 == 0 else "CLIENT", name=f"GET /item/{i}",
                        start_ns=_T0 + i * 1000, end_ns=_T0 + i * 1000 + 500,
                        attributes=(("http.request.method", "GET"), ("url.path", f"/item/{i}"),
                                    ("http.response.status_code", 200 if i % 5 else 503),
                                    ("weft.link", "root" if i == 0 else "thread")),
                        resource=_RESOURCES[i % 2], error=i % 5 == 0 and i > 0))
    return out


def _assert_same(sent: list[Span], received: list[ReceivedSpan]) -> None:
    assert len(received) == len(sent)
    by_id = {r.span_id: r for r in received}
    assert len(by_id) == len(sent), "a span arrived twice"
    for span in sent:
        got = by_id[span.span_id]
        assert (got.trace_id, got.parent_span_id, got.name) == (span.trace_id, span.parent_span_id, span.name)
        assert (got.start_ns, got.end_ns) == (span.start_ns, span.end_ns)
        assert got.kind == (2 if span.kind == "SERVER" else 3)  # OTLP SPAN_KIND_SERVER / _CLIENT
        assert got.flags & 0x01, "sampled flag must be set"
        assert got.attributes == dict(span.attributes)
        assert got.resource == dict(span.resource.attributes())


def test_grpc_exports_exact_ids_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-weft-test=yes,authorization=Bearer%20t0k")
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        sent = _spans(1200)
        with OtlpSpanExporter(OtlpSettings.from_env()) as exporter:
            exporter.export(sent[:700])
            exporter.export(sent[700:])
            _assert_same(sent, rx.wait_for(len(sent), timeout=20))
        assert exporter.stats.exported == len(sent)
        assert all(sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans) <= 512
                   for r in rx.requests)
        assert rx.metadata[0]["x-weft-test"] == "yes"
        assert rx.metadata[0]["authorization"] == "Bearer t0k"


def test_grpc_retries_transient_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as rx:
        rx.fail_next(2)  # UNAVAILABLE twice; the SDK backs off ~1 s, then ~2 s
        exporter = OtlpSpanExporter(OtlpSettings(endpoint=rx.endpoint))
        sent = _spans(10)
        exporter.export(sent)
        _assert_same(sent, rx.wait_for(10, timeout=20))
        assert rx.calls == 3
        exporter.shutdown()
        assert (exporter.stats.exported, exporter.stats.failed) == (10, 0)


def test_grpc_gives_up_on_permanent_errors_and_counts() -> None:
    import grpc

    with OtlpReceiver() as rx:
        rx.fail_next(1, grpc.StatusCode.INVALID_ARGUMENT)
        exporter = OtlpSpanExporter(OtlpSettings(endpoint=rx.endpoint))
        exporter.export(_spans(3))
        assert exporter.force_flush(10)
        assert (exporter.stats.exported, exporter.stats.failed) == (0, 3)
        exporter.export(_spans(4))  # the exporter keeps working after a lost batch
        exporter.shutdown()
        assert exporter.stats.exported == 4 and rx.calls == 2


def test_shutdown_flushes_before_the_schedule_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    with OtlpReceiver() as rx:
        exporter = OtlpSpanExporter(OtlpSettings.from_env(endpoint=rx.endpoint))
        exporter.export(_spans(5))
        time.sleep(0.3)
        assert rx.spans == []  # held for the 60 s delay ...
        exporter.shutdown()
        _assert_same(_spans(5), rx.spans)  # ... until shutdown flushed it


def test_http_protobuf_exports_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpHttpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-weft-test=http")
        rx.fail_next(1, 503)
        settings = OtlpSettings.from_env()
        assert settings.protocol == "http/protobuf"
        sent = _spans(600)
        with OtlpSpanExporter(settings) as exporter:
            exporter.export(sent)
        _assert_same(sent, rx.spans)
        assert rx.calls == 3  # one 503, then two batches (512 + 88)
        assert rx.metadata[0]["x-weft-test"] == "http"
        assert rx.metadata[0]["content-type"] == "application/x-protobuf"


def test_settings_name_bad_values() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        OtlpSettings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ConfigError, match="OTEL_BSP_SCHEDULE_DELAY"):
        OtlpSettings.from_env({"OTEL_BSP_SCHEDULE_DELAY": "soon"})
    traces_wins = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert OtlpSettings.from_env(traces_wins).protocol == "http/protobuf"


def test_more_spans_than_the_queue_holds_are_all_sent() -> None:
    """`weft rebuild --otlp` hands over a whole rebuild at once: backpressure, not drops."""
    with OtlpReceiver() as rx:
        settings = OtlpSettings(endpoint=rx.endpoint, max_queue_size=1000, max_export_batch_size=200)
        sent = _spans(3500)
        with OtlpSpanExporter(settings) as exporter:
            exporter.export(sent)
        assert exporter.stats.dropped == 0
        _assert_same(sent, rx.spans)
