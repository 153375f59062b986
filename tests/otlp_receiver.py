"""A real OTLP/gRPC trace receiver for tests: the opentelemetry-proto TraceService on loopback.

    with OtlpReceiver() as rx:                      # listens on 127.0.0.1:<free port>
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ...
        spans = rx.wait_for(12, timeout=30)         # ReceivedSpan list, arrival order

`fail_next(n, code)` makes the next n Export calls fail with a gRPC status, to exercise the
exporter's retry. Everything received is kept (thread-safe), including the raw requests.
`OtlpHttpReceiver` is the same for OTLP/HTTP with binary protobuf (POST /v1/traces).
"""

from __future__ import annotations

import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2


def any_value(value: AnyValue) -> Any:
    """The Python value inside an OTLP AnyValue (scalars only; that is all Weft sends)."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver saw it, with its resource's attributes flattened."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    name: str
    kind: int
    start_ns: int
    end_ns: int
    flags: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    received_at: float  # time.monotonic() when the Export call arrived

    @classmethod
    def from_proto(cls, span: trace_pb2.Span, resource: dict[str, Any], at: float) -> ReceivedSpan:
        return cls(trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id,
                   name=span.name, kind=span.kind, start_ns=span.start_time_unix_nano,
                   end_ns=span.end_time_unix_nano, flags=span.flags,
                   attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                   resource=resource, received_at=at)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._rx = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # gRPC method name
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        return self._rx._on_export(request, context)


class _Collector:
    """What a receiver got, thread-safe, with a condition to wait on."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.calls = 0
        self._failures: list[Any] = []

    def _next_failure(self) -> Any:
        """Count a call; the failure to answer it with, if one was queued."""
        with self._lock:
            self.calls += 1
            return self._failures.pop(0) if self._failures else None

    def _store(self, request: trace_service_pb2.ExportTraceServiceRequest,
               metadata: dict[str, str]) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests.append(request)
            self.metadata.append(metadata)
            for rs in request.resource_spans:
                resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self._spans.extend(ReceivedSpan.from_proto(s, resource, now) for s in ss.spans)
            self._lock.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.requests.clear()

    def wait_for(self, n: int, timeout: float) -> list[ReceivedSpan]:
        """Block until at least n spans arrived; raise TimeoutError naming how many did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"OTLP receiver got {len(self._spans)} of {n} spans "
                                       f"in {timeout:.0f} s")
                self._lock.wait(left)
            return list(self._spans)



class OtlpReceiver(_Collector):
    """In-process OTLP/gRPC TraceService on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[bytes, bytes] | None = None) -> None:
        """`tls`: (certificate chain PEM, private key PEM) to serve TLS only (endpoint https://)."""
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        if tls is None:
            self.port = self._server.add_insecure_port(f"{host}:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(f"{host}:0", credentials)
        self.endpoint = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._server.start()

    def _on_export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                   context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        failure = self._next_failure()
        if failure is not None:
            context.abort(failure, "receiver told to fail this call")
        self._store(request, {k: str(v) for k, v in context.invocation_metadata()})
        return trace_service_pb2.ExportTraceServiceResponse()

    def fail_next(self, n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        with self._lock:
            self._failures.extend([code] * n)

    def stop(self) -> None:
        self._server.stop(grace=0.5).wait()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class OtlpHttpReceiver(_Collector):
    """In-process OTLP/HTTP (binary protobuf) trace receiver: POST /v1/traces."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate PEM file, key PEM file) to serve HTTPS only."""
        super().__init__()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's method name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                failure = collector._next_failure()
                if failure is not None or self.path != "/v1/traces":
                    self.send_response(failure or 404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector._store(request, {k.lower(): v for k, v in self.headers.items()})
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

        self._server = ThreadingHTTPServer((host, 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.endpoint = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpHttpReceiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
