"""Workloads of tests/integration/test_probe_inject.py: real servers that report what they got.

`python -m tests.integration.inject_workloads echo PORT`: an HTTP/1.1 server on raw sockets that
answers every request with JSON {sha: sha256 of the request bytes as received, tp: its traceparent
values, raw: the bytes}. `... nested PORT DOWNSTREAM_PORT`: a ThreadingHTTPServer whose handler
calls the downstream once from its own thread and once from a thread it spawns, and answers with
what the downstream saw. `... pooled PORT DOWNSTREAM_PORT`: the same, but every call goes through
one worker thread created during the first request (a pool). `... client PORT`: sends the test's
requests (one send, several sends, one with its own traceparent, a POST body, keep-alive) and
prints one JSON line per request; `after PORT DOWNSTREAM_PORT`: one thread that calls the
downstream after answering /call-after (outside any request); `edges PORT` sends the fast
path's edge cases (one JSON line each); `once` / `twice` call the nested / pooled server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import queue
import socket
import struct
import sys
import threading
from typing import Any

OWN_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    clen = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            clen = int(value)
    while len(rest) < clen:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    return head + b"\r\n\r\n" + rest[:clen], rest[clen:]


def traceparents(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() == b"traceparent"]


def _serve_echo(conn: socket.socket) -> None:
    buf = b""
    with conn:
        while True:
            got = _read_request(conn, buf)
            if got is None:
                return
            raw, buf = got
            body = json.dumps({"sha": hashlib.sha256(raw).hexdigest(), "tp": traceparents(raw),
                               "raw": raw.decode("latin-1")}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _listening(port: int) -> socket.socket:
    """A listening socket on the loopback port; "ready" is printed once it listens."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("ready", flush=True)
    return srv


def echo(port: int) -> None:
    srv = _listening(port)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_echo, args=(conn,), daemon=True).start()


def _segs_out(s: socket.socket) -> int:
    """tcp_info.tcpi_data_segs_out (offset 156 in struct tcp_info, Linux 4.6+): segments that
    carried data, so the ACK of an early answer does not count."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("I", info, 156)[0])


def call(port: int, parts: list[bytes],
         conn: socket.socket | None = None) -> tuple[socket.socket, dict[str, Any]]:
    """Send a request in `parts` (one send each), read the JSON answer; answer["segs"] is the
    number of TCP segments the sends took (TCP_NODELAY: one per send unless something split it)."""
    s = conn or socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    segs0 = _segs_out(s)
    for part in parts:
        s.sendall(part)
    segs = _segs_out(s) - segs0
    (answer,), _ = read_answers(s, 1)
    answer["sent_sha"] = hashlib.sha256(b"".join(parts)).hexdigest()
    answer["segs"] = segs
    return s, answer


def read_answers(s: socket.socket, count: int, buf: bytes = b"") -> tuple[list[dict[str, Any]], bytes]:
    """`count` JSON answers from s, in order, and the bytes read past them."""
    answers = []
    for _ in range(count):
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed before the answer")
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        n = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length"))
        while len(buf) < n:
            buf += s.recv(65536)
        answers.append(json.loads(buf[:n]))
        buf = buf[n:]
    return answers, buf


def client(port: int) -> None:
    cases = {
        "single": [b"GET /single HTTP/1.1\r\nHost: t\r\n\r\n"],
        "split": [b"GET /split HTTP/1.1\r\nHost: t\r\n", b"Accept: */*\r\n", b"\r\n"],
        "own": [f"GET /own HTTP/1.1\r\nHost: t\r\nTraceparent: {OWN_TP}\r\n\r\n".encode()],
        "post": [b"POST /post HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"],
        # a body past the injector's scan window, in the same send as the headers
        "bigpost": [b"POST /bigpost HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n" + b"x" * 3000],
        # past the page the injector re-joins after its push: the pushed line stays its own buffer
        "hugepost": [b"POST /hugepost HTTP/1.1\r\nHost: t\r\nContent-Length: 6000\r\n\r\n" + b"y" * 6000],
        "again": [b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n"],
    }
    conn = None
    for name, parts in cases.items():
        conn, answer = call(port, parts, conn)
        print(json.dumps({"case": name, **answer}), flush=True)
    assert conn is not None
    conn.close()


def _edge_cases() -> list[tuple[str, str, int, list[bytes]]]:
    """(name, expected, fast, sends) for the injector's 8-byte fast path and its hand-over to the
    byte-wise scanner. expected: "inject" (one traceparent added), "own" (the request's own one,
    alone) or "none" (nothing added); fast: how many of the sends the fast path settles (the
    others go to the scanner). A name starting "ka-" follows the previous case on its connection,
    so a wrongly skipped body would show up there."""
    tp = OWN_TP.encode()
    fake = b"GET /x HTTP/1.1\r\ntraceparent: 00-1\r\n\r\n\r\rx"
    cases: list[tuple[str, str, int, list[bytes]]] = []
    # every alignment of the header lines against the 8-byte words the fast path reads
    for pad in range(8):
        path = b"/align-" + b"p" * pad
        cases += [
            (f"align-{pad}", "inject", 1,
             [b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"]),
            (f"ka-align-{pad}", "inject", 1, [b"GET " + path + b"/next HTTP/1.1\r\nHost: t\r\n\r\n"]),
            (f"own-align-{pad}", "own", 1,
             [b"GET " + path + b" HTTP/1.1\r\nHost: t\r\ntraceparent: " + tp + b"\r\n\r\n"]),
        ]
    cases += [
        ("mixed-case-own", "own", 1, [b"GET /mixed HTTP/1.1\r\nHost: t\r\nTrAcEpArEnT: " + tp + b"\r\n\r\n"]),
        ("own-last-before-blank", "own", 1,
         [b"GET /own-last HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nTRACEPARENT:" + tp + b"\r\n\r\n"]),
        # names that only start like the ones followed
        ("lookalike-names", "inject", 1,
         [b"GET /lookalike HTTP/1.1\r\nTraceparentx: 1\r\nTracepar: 2\r\nContent-Type: a\r\n"
          b"Content-Lengthy: 7\r\nX-Traceparent: 3\r\nTransfer: 4\r\n\r\n"]),
        ("ka-lookalike-names", "inject", 1, [b"GET /after-lookalike HTTP/1.1\r\nHost: t\r\n\r\n"]),
        ("mixed-case-length", "inject", 1,
         [b"POST /mixed-length HTTP/1.1\r\ncOnTeNt-lEnGtH: 11\r\nHost: t\r\n\r\nhello world"]),
        ("ka-mixed-case-length", "inject", 1, [b"GET /after-mixed-length HTTP/1.1\r\nHost: t\r\n\r\n"]),
        # a body that looks like a request with a traceparent: body bytes are never read as headers
        ("body-like-head", "inject", 1,
         [b"POST /body-like-head HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(fake), fake)]),
        ("ka-body-like-head", "inject", 1, [b"GET /after-body-like-head HTTP/1.1\r\nHost: t\r\n\r\n"]),
        # the body in later sends than the head (those are skipped by arithmetic)
        ("body-later", "inject", 1,
         [b"POST /body-later HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n", b"hello", b"world"]),
        ("ka-body-later", "inject", 1, [b"GET /after-body-later HTTP/1.1\r\nHost: t\r\n\r\n"]),
        # header names and values split across sends: the byte-wise scanner carries them over
        ("name-across-sends", "own", 0,
         [b"GET /name-across HTTP/1.1\r\nHost: t\r\nTrace", b"parent: " + tp + b"\r\n\r\n"]),
        ("length-across-sends", "inject", 0,
         [b"POST /length-across HTTP/1.1\r\nHost: t\r\nContent-Len", b"gth: 1", b"2\r\n\r\nhello world!"]),
        ("ka-length-across-sends", "inject", 1, [b"GET /after-length-across HTTP/1.1\r\nHost: t\r\n\r\n"]),
        # a method longer than a word, and lengths outside the fast path's 1..6 digits
        ("long-method", "inject", 0, [b"PROPFIND /long-method HTTP/1.1\r\nHost: t\r\n\r\n"]),
        ("long-length", "inject", 0,
         [b"POST /long-length HTTP/1.1\r\nHost: t\r\nContent-Length: 0000005\r\n\r\nhello"]),
        ("ka-long-length", "inject", 1, [b"GET /after-long-length HTTP/1.1\r\nHost: t\r\n\r\n"]),
        ("spaces-before-length", "inject", 0,
         [b"POST /spaces HTTP/1.1\r\nHost: t\r\nContent-Length:   3\r\n\r\nabc"]),
        ("ka-spaces-before-length", "inject", 1, [b"GET /after-spaces HTTP/1.1\r\nHost: t\r\n\r\n"]),
        ("shortest", "inject", 1, [b"GET / HTTP/1.1\r\n\r\n"]),
        # the HTTP/2 preface's first part (plain-text gRPC): its request line is not HTTP/1.x
        ("h2-preface", "none", 0, [b"PRI * HTTP/2.0\r\n\r\n"]),
    ]
    # a head ending exactly at the end of the bytes followed (1024); one whose blank line's LF is
    # past them (the line still goes in, then the injector gives up on the connection, as it
    # always did); one whose whole blank line is past them (nothing added)
    for name, size, expected, fast in (("head-1024", 1024, "inject", 1), ("head-1025", 1025, "inject", 0),
                                       ("head-1026", 1026, "none", 0)):
        head = b"GET /" + name.encode() + b" HTTP/1.1\r\nHost: t\r\nX-Pad: "
        cases.append((name, expected, fast, [head + b"a" * (size - len(head) - 4) + b"\r\n\r\n"]))
    return cases


def edges(port: int) -> None:
    """One JSON line per edge case: {case, expected, fast, sends, ...answer}."""
    conn = None
    for name, expected, fast, parts in _edge_cases():
        if not name.startswith("ka-") and conn is not None:
            conn.close()
            conn = None
        conn, answer = call(port, parts, conn)
        print(json.dumps({"case": name, "expected": expected, "fast": fast, "sends": len(parts),
                          "head_in_first": b"\r\n\r\n" in parts[0], **answer}), flush=True)
    if conn is not None:
        conn.close()
    # the end of one request's body and the next request in one send: the injector stops
    # following the body where it ends and reads the next head on its own, and so does the http
    # tracer, whose record of that request carries the injected ids.
    head = b"POST /tail-first HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n"
    nxt = b"GET /tail-next HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in (head, b"hello", b"world" + nxt):
            s.sendall(part)
        answers, _ = read_answers(s, 2)
    for name, sent, answer in (("tail-first", head + b"helloworld", answers[0]),
                               ("tail-next", nxt, answers[1])):
        print(json.dumps({"case": name, "expected": "inject", "fast": 1, "sends": 3,
                          "head_in_first": True, "sent_sha": hashlib.sha256(sent).hexdigest(),
                          "segs": 0, **answer}), flush=True)


class _JsonHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply_json(self, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Nested(_JsonHandler):
    downstream = 0

    def do_GET(self) -> None:
        results: dict[str, Any] = {}
        _, results["same_thread"] = call(self.downstream, [b"GET /from-handler HTTP/1.1\r\nHost: d\r\n\r\n"])

        def spawned() -> None:
            _, results["spawned"] = call(self.downstream, [b"GET /from-thread HTTP/1.1\r\nHost: d\r\n\r\n"])

        worker = threading.Thread(target=spawned)
        worker.start()
        worker.join()
        self.reply_json({"incoming": self.headers.get_all("traceparent") or [], **results})


class _Pooled(_JsonHandler):
    """Hands each downstream call to one worker thread, made during the first request."""

    downstream = 0
    jobs: queue.Queue[queue.Queue[dict[str, Any]]] = queue.Queue()
    worker: threading.Thread | None = None

    @classmethod
    def _work(cls) -> None:
        while True:
            reply = cls.jobs.get()
            reply.put(call(cls.downstream, [b"GET /from-pool HTTP/1.1\r\nHost: d\r\n\r\n"])[1])

    def do_GET(self) -> None:
        if _Pooled.worker is None:
            _Pooled.worker = threading.Thread(target=_Pooled._work, daemon=True)
            _Pooled.worker.start()
        reply: queue.Queue[dict[str, Any]] = queue.Queue()
        self.jobs.put(reply)
        self.reply_json({"incoming": self.headers.get_all("traceparent") or [], "pool": reply.get()})


def after(port: int, downstream: int) -> None:
    """One thread serves every request (keep-alive, raw sockets); after answering a request for
    /call-after it calls the downstream itself, outside any request, and prints what the
    downstream saw (a new trace may be injected there, never the ended request's)."""
    srv = _listening(port)
    while True:
        conn, _ = srv.accept()
        buf = b""
        with conn:
            while (got := _read_request(conn, buf)) is not None:
                raw, buf = got
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                if raw.startswith(b"GET /call-after "):
                    down, answer = call(downstream, [b"GET /after HTTP/1.1\r\nHost: d\r\n\r\n"])
                    down.close()
                    print(json.dumps(answer), flush=True)


def pooled(port: int, downstream: int) -> None:
    _Pooled.downstream = downstream
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Pooled)
    print("ready", flush=True)
    server.serve_forever()


def nested(port: int, downstream: int) -> None:
    _Nested.downstream = downstream
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Nested)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    mode, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    if mode == "echo":
        echo(args[0])
    elif mode == "nested":
        nested(args[0], args[1])
    elif mode == "client":
        client(args[0])
    elif mode == "edges":
        edges(args[0])
    elif mode == "pooled":
        pooled(args[0], args[1])
    elif mode == "after":
        after(args[0], args[1])
    elif mode == "once":
        _, answer = call(args[0], [b"GET /nested HTTP/1.1\r\nHost: n\r\n\r\n"])
        print(json.dumps(answer), flush=True)
    elif mode == "twice":  # two requests on one keep-alive connection: one server thread
        conn = None
        for path in (b"/pool-1", b"/pool-2"):
            conn, answer = call(args[0], [b"GET " + path + b" HTTP/1.1\r\nHost: p\r\n\r\n"], conn)
            print(json.dumps(answer), flush=True)
