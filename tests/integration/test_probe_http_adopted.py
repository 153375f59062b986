"""Connections that were open before the tracer was loaded (an agent restarted under pooled
keep-alive connections, a rollout of the DaemonSet): picked up at their first use, mid-stream,
with the right role on each end, and whatever is in flight then (the rest of a body) is not
taken for a request.

Each case plays a script on one connection up to where the tracer is loaded, and the rest of it
after: both ends must record exactly the requests that start after the load.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from multiprocessing.synchronize import Event as EventType

import pytest

from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import loaded
from tests.integration.test_probe_http import requests_on
from tests.integration.test_probe_http_other_protocols import Script, _play

pytestmark = pytest.mark.bpf

GET_A = [("c", b"GET /a HTTP/1.1\r\nHost: pool\r\n\r\n"),
         ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
GET_B = [("c", b"GET /b HTTP/1.1\r\nHost: pool\r\n\r\n"),
         ("s", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")]
CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
TEXT = b"I loved it. A GET is not a POST / HTTP/1.1 but words\r\n"


def _one_connection(before: Script, after: Script, ports: multiprocessing.Queue[int], go: EventType) -> None:
    """Child: a raw server thread and a raw client on one connection; `before`, then (once `go`
    is set) `after`."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    loaded_once = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            _play(conn, before, "s")
            loaded_once.wait(30)
            _play(conn, after, "s")

    server = threading.Thread(target=serve)
    server.start()
    with socket.create_connection(listener.getsockname()) as client:
        _play(client, before, "c")
        go.wait(60)
        loaded_once.set()
        _play(client, after, "c")
        server.join(30)


def _adopted(before: Script, after: Script, expected: list[tuple[str, str, int]]) -> None:
    ctx = multiprocessing.get_context("fork")
    ports: multiprocessing.Queue[int] = ctx.Queue()
    go = ctx.Event()
    child = ctx.Process(target=_one_connection, args=(before, after, ports, go))
    child.start()
    try:
        port = ports.get(timeout=10)
        time.sleep(0.2)            # `before` played
        with loaded(HttpProbe()) as probe:
            go.set()
            child.join(30)
            assert child.exitcode == 0
            if expected:
                requests_on(probe, port, pb.ROLE_SERVER, len(expected))
                requests_on(probe, port, pb.ROLE_CLIENT, len(expected))
            time.sleep(0.3)        # nothing more may come
            servers = requests_on(probe, port, pb.ROLE_SERVER, 0)
            clients = requests_on(probe, port, pb.ROLE_CLIENT, 0)
    finally:
        go.set()
        child.join(5)
    assert [(r.method, r.path, r.status) for r in servers] == expected
    assert [(r.method, r.path, r.status) for r in clients] == expected
    for s, c in zip(servers, clients, strict=True):
        assert s.tcp_seq == c.tcp_seq and s.has_seq and c.has_seq
        assert (s.tuple.local_port, c.tuple.remote_port) == (port, port)
        assert c.start_ns <= s.start_ns <= s.end_ns <= c.end_ns


def test_an_idle_pooled_connection_is_picked_up_at_its_next_request() -> None:
    _adopted(GET_A, [*GET_A, *GET_B], [("GET", "/a", 200), ("GET", "/b", 404)])


def test_a_connection_loaded_in_the_middle_of_a_response_body() -> None:
    """The body's rest starts with upper-case text: the response direction, not a request."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 + len(TEXT))
    _adopted([GET_A[0], ("s", head + b"0123456789")], [("s", TEXT), *GET_B], [("GET", "/b", 404)])


def test_a_connection_loaded_in_the_middle_of_a_request_body() -> None:
    """The rest of an upload reads like a request line; it is answered, then the next request."""
    post = b"POST /up HTTP/1.1\r\nHost: pool\r\nContent-Length: %d\r\n\r\n" % (5 + len(TEXT))
    _adopted([("c", post + b"hello")], [("c", TEXT), ("s", CREATED), *GET_B], [("GET", "/b", 404)])
