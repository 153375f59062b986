"""A Python demo service: `python -m tests.workloads.demo.py_service CONFIG_JSON`.

CONFIG_JSON: {"service", "listen": "host:port", "truth": path, "calls": [{"to", "addr", "hop",
"mode"}]}. GET /<service>/r-<rid> calls every downstream `to` at /<to>/r-<rid>.<to>:
mode "spawn" calls from a freshly spawned thread (all spawned calls run in parallel: the
fan-out), mode "thread" calls from the handler thread itself, one after the other. Connections
to each downstream come from a keep-alive pool. The true parent travels by hand in
`x-truth-parent` (the caller's rid) and `x-truth-hop` (how the request reached us); Weft never
reads either. ThreadingHTTPServer serves each connection on its own thread.
"""

from __future__ import annotations

import http.client
import json
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.workloads.demo.truth_log import TruthLog

HOP_OF_MODE = {"spawn": "spawned_thread", "thread": "thread"}


class KeepAlivePool:
    """Persistent HTTP/1.1 connections to one address, handed to one caller at a time."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def get(self, path: str, headers: dict[str, str]) -> int:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        self._idle.put(conn)
        return response.status


class Service:
    def __init__(self, config: dict[str, Any]) -> None:
        self.name: str = config["service"]
        self.calls: list[dict[str, str]] = config.get("calls", [])
        self.truth = TruthLog(config["truth"], self.name)
        self.pools = {c["to"]: KeepAlivePool(c["addr"]) for c in self.calls}

    def call(self, call: dict[str, str], rid: str, results: list[int]) -> None:
        child = f"{rid}.{call['to']}"
        self.truth.write(child, rid, "client", HOP_OF_MODE[call["mode"]])
        try:
            results.append(self.pools[call["to"]].get(
                f"/{call['to']}/r-{child}", {"x-truth-parent": rid, "x-truth-hop": call["hop"]}))
        except (OSError, http.client.HTTPException):
            results.append(599)

    def handle(self, rid: str) -> int:
        """Make the downstream calls of request `rid`; the worst status seen."""
        results: list[int] = []
        spawned = [threading.Thread(target=self.call, args=(c, rid, results))
                   for c in self.calls if c["mode"] == "spawn"]
        for t in spawned:
            t.start()
        for c in self.calls:
            if c["mode"] == "thread":
                self.call(c, rid, results)
        for t in spawned:
            t.join()
        return max(results, default=200)


def make_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    prefix = f"/{service.name}/r-"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are separate writes: with Nagle on, each response would wait for the
        # client's delayed ACK (~40 ms).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith(prefix):
                rid = path[len(prefix):]
                service.truth.write(rid, self.headers.get("x-truth-parent", ""), "server",
                                    self.headers.get("x-truth-hop", "cross_node"), self.client_address[0])
                status = service.handle(rid)
            else:
                status = 200 if path == "/health" else 404
            body = f"{service.name} {status}\n".encode()
            self.send_response(200 if status < 400 else 502)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    config = json.loads(sys.argv[1])
    service = Service(config)
    host, port = config["listen"].rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(service))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
