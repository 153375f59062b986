"""Python http.server workloads for Weft's probe tests.

`python -m tests.workloads.py_server HOST PORT [threading|thread-per-request]`:
  threading           ThreadingHTTPServer (HTTP/1.1 keep-alive), GET -> 200 "ok <path>"
  thread-per-request  one acceptor thread; each request is handed to a new thread, whose tid
                      the response names (X-Handler-Tid) so a test can check the spawn link.
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (40 ms) and a keep-alive client gets ~25 requests/s per connection.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        status = 404 if path == "/missing" else 200
        body = f"ok {path}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Handler-Tid", str(threading.get_native_id()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class ThreadPerRequestServer(HTTPServer):
    """Accepts on one thread, serves each connection's requests on a new thread."""

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        t = threading.Thread(target=self._serve, args=(request, client_address))
        t.start()

    def _serve(self, request: socket.socket, client_address: object) -> None:
        self.finish_request(request, client_address)  # type: ignore[arg-type]
        self.shutdown_request(request)


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    host, port, mode = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "threading")
    cls: type[HTTPServer] = ThreadPerRequestServer if mode == "thread-per-request" else ThreadingHTTPServer
    if ":" in host:
        cls = V6Server
    with cls((host, port), Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
