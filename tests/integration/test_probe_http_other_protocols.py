"""Connections that speak another protocol over a traced socket make no HTTP/1 records.

Plain-text gRPC (HTTP/2 with prior knowledge) opens with the HTTP/2 preface, "PRI * HTTP/2.0";
WebSocket and h2c upgrades switch with a 101; a proxy's CONNECT opens a tunnel with a 2xx.
Without care the first would leave a bogus
"PRI *" request that never gets a status line (a failed span per gRPC connection), and bytes
inside a tunnel could be taken for requests. Each test scripts one such connection byte for
byte between a raw server and a raw client, then one plain HTTP/1.1 exchange on a second
connection: once that exchange is recorded, the first connection's records (if any) are too.
"""

from __future__ import annotations

import multiprocessing
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.integration.test_probe_http import requests_on
from tests.tls import TestPki

pytestmark = pytest.mark.bpf

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"       # an empty SETTINGS frame
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
# HEADERS (END_STREAM | END_HEADERS) on stream 1, HPACK static-table entries only:
H2_GET = b"\x00\x00\x03\x01\x05\x00\x00\x00\x01\x82\x86\x84"     # :method GET, :scheme http, :path /
H2_200 = b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x88"             # :status 200
# bytes inside a tunnel that read like a request and its response
TUNNELLED = [("c", b"GET /inside HTTP/1.1\r\nHost: tunnel\r\n\r\n"),
             ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
AFTER = [("c", b"GET /after HTTP/1.1\r\nHost: plain\r\n\r\n"),
         ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]

# ("c", bytes the client sends) / ("s", bytes the server sends); a list of buffers is sent as
# one vector call (sendmsg), as writev-style clients and servers do
Script = list[tuple[str, bytes | list[bytes]]]


def _recv_exactly(sock: socket.socket, n: int) -> None:
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("peer closed")
        n -= len(chunk)


def _play(sock: socket.socket, script: Script, side: str) -> None:
    for who, data in script:
        buffers = data if isinstance(data, list) else [data]
        size = sum(len(b) for b in buffers)
        if who != side:
            _recv_exactly(sock, size)
        elif len(buffers) == 1:
            sock.sendall(buffers[0])
        else:
            assert sock.sendmsg(buffers) == size   # one call (small, on loopback)


def _converse(first: Script, ports: multiprocessing.Queue[int]) -> None:
    """Child process: a raw server thread and a raw client; `first` on one connection, then
    AFTER on a second one."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])

    def serve() -> None:
        for script in (first, AFTER):
            conn, _ = listener.accept()
            with conn:
                _play(conn, script, "s")

    server = threading.Thread(target=serve)
    server.start()
    for script in (first, AFTER):
        with socket.create_connection(listener.getsockname()) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _play(client, script, "c")
    server.join(10)


def converse(first: Script) -> int:
    ports: multiprocessing.Queue[int] = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_converse, args=(first, ports))
    child.start()
    port = ports.get(timeout=10)
    child.join(30)
    assert child.exitcode == 0
    return port


@pytest.fixture(scope="module")
def probe() -> Iterator[LoadedProbe]:
    with loaded(HttpProbe()) as lp:
        yield lp


def _recorded(probe: LoadedProbe, port: int, count: int) -> tuple[list[pb.HttpRequest], list[pb.HttpRequest]]:
    requests_on(probe, port, pb.ROLE_SERVER, count)
    requests_on(probe, port, pb.ROLE_CLIENT, count)
    time.sleep(0.2)   # nothing more may come
    return (requests_on(probe, port, pb.ROLE_SERVER, count), requests_on(probe, port, pb.ROLE_CLIENT, count))


def test_an_http2_prior_knowledge_connection_makes_no_record(probe: LoadedProbe) -> None:
    before = probe.stats()["other_protocol"]
    port = converse([("c", H2_PREFACE + H2_SETTINGS), ("s", H2_SETTINGS + H2_SETTINGS_ACK),
                     ("c", H2_SETTINGS_ACK + H2_GET), ("s", H2_200), *TUNNELLED])
    servers, clients = _recorded(probe, port, 1)
    assert [(r.method, r.path, r.status) for r in servers] == [("GET", "/after", 200)]
    assert [(r.method, r.path, r.status) for r in clients] == [("GET", "/after", 200)]
    assert probe.stats()["other_protocol"] - before == 2    # its server end and its client end


def test_a_switch_of_protocols_ends_the_request_and_the_tunnel_makes_no_record(probe: LoadedProbe) -> None:
    switch = b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    upgrade = [("c", b"GET /ws HTTP/1.1\r\nHost: up\r\n" + switch),
               ("s", b"HTTP/1.1 101 Switching Protocols\r\n" + switch)]
    port = converse([*upgrade, *TUNNELLED, *TUNNELLED])
    servers, clients = _recorded(probe, port, 2)
    for records in (servers, clients):
        assert [(r.method, r.path, r.status, r.flags) for r in records] == [
            ("GET", "/ws", 101, pb.HTTP_FLAG_HTTP_1_1), ("GET", "/after", 200, pb.HTTP_FLAG_HTTP_1_1)]
    assert servers[0].tcp_seq == clients[0].tcp_seq


def test_a_proxy_tunnel_ends_its_connect_and_makes_no_record_inside(probe: LoadedProbe) -> None:
    connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    port = converse([("c", connect), ("s", b"HTTP/1.1 200 Connection Established\r\n\r\n"), *TUNNELLED])
    servers, clients = _recorded(probe, port, 2)
    for records in (servers, clients):
        assert [(r.method, r.path, r.status) for r in records] == [
            ("CONNECT", "example.com:443", 200), ("GET", "/after", 200)]


def test_a_refused_connect_leaves_the_connection_http(probe: LoadedProbe) -> None:
    connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    refused = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    port = converse([("c", connect), ("s", refused), *TUNNELLED])
    servers, clients = _recorded(probe, port, 3)
    for records in (servers, clients):
        assert [(r.method, r.path, r.status) for r in records] == [
            ("CONNECT", "example.com:443", 407), ("GET", "/inside", 200), ("GET", "/after", 200)]


def _converse_tls(pki: TestPki, ports: multiprocessing.Queue[int]) -> None:
    """Child process: one HTTP/1.1 exchange inside TLS (Python's ssl, i.e. OpenSSL), then AFTER
    in plain text on a second connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server.cert, pki.server.key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    inside = [("c", b"GET /secret HTTP/1.1\r\nHost: tls\r\n\r\n"),
              ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            _play(tls, inside, "s")
        conn, _ = listener.accept()
        with conn:
            _play(conn, AFTER, "s")

    server = threading.Thread(target=serve)
    server.start()
    with socket.create_connection(listener.getsockname()) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        _play(tls, inside, "c")
    with socket.create_connection(listener.getsockname()) as client:
        _play(client, AFTER, "c")
    server.join(10)


def test_https_makes_no_record(probe: LoadedProbe, tmp_path: Path) -> None:
    """TLS bytes are not HTTP/1: an HTTPS exchange is not traced (README, Known limits), and
    each of its calls is counted as not HTTP, on both ends."""
    pki = TestPki.make(tmp_path / "pki")
    before = probe.stats()["not_http"]
    ctx = multiprocessing.get_context("fork")
    ports: multiprocessing.Queue[int] = ctx.Queue()
    child = ctx.Process(target=_converse_tls, args=(pki, ports))
    child.start()
    port = ports.get(timeout=10)
    child.join(30)
    assert child.exitcode == 0
    servers, clients = _recorded(probe, port, 1)
    assert [(r.method, r.path, r.status) for r in servers] == [("GET", "/after", 200)]
    assert [(r.method, r.path, r.status) for r in clients] == [("GET", "/after", 200)]
    assert probe.stats()["not_http"] - before >= 2
