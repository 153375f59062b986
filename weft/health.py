"""/healthz and /readyz beside /metrics on a component's Prometheus port: what a Kubernetes
liveness or readiness probe (or a load balancer, or a person with curl) asks.

Each answers 200 or 503 with one line saying why, from a check the component gives: a callable
returning (ok, detail) that only reads what the component keeps anyway, so a probe costs the
agent or the stitcher nothing. Every other path is the Prometheus exposition, as before.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

Check = Callable[[], tuple[bool, str]]


def always_ok() -> tuple[bool, str]:
    return True, "running"


class HealthApp:
    """WSGI: /healthz → `live`, /readyz → `ready`, anything else → the registry's metrics."""

    def __init__(self, registry: CollectorRegistry, live: Check = always_ok,
                 ready: Check = always_ok) -> None:
        self._metrics = make_wsgi_app(registry)
        self._checks = {"/healthz": live, "/readyz": ready}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = self._checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return self._metrics(environ, start_response)   # type: ignore[no-any-return]
        try:
            ok, detail = check()
        except Exception as exc:  # a check that fails says so; it never takes the server down
            ok, detail = False, f"the check itself failed: {exc!r}"
        body = f"{'ok' if ok else 'not ok'}: {detail}\n".encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""


def serve(app: HealthApp, port: int, addr: str = "127.0.0.1") -> int:
    """Serve `app` from a daemon thread; returns the port (given 0: the one chosen)."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(addr, port, app, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="weft-metrics", daemon=True).start()
    return int(server.server_port)
