"""The HTTP tracer's 8-bytes-at-a-time steps against a model of what it must keep.

The kernel parser takes a whole word where none of its 8 bytes changes the parser's state and
falls back to single bytes elsewhere (bpf/http_tracer.bpf.c, "8 bytes at a time"). These tests
send seeded random requests and responses — header names of every length around the 8- and
16-byte marks in mixed case, paths and Host/traceparent/tracestate values around their kept
lengths, query strings, bare LF line ends, request-line versions — cut into random writes, and
compare every record, server and client side, with what a plain byte-by-byte reading of the
same bytes keeps.
"""

from __future__ import annotations

import multiprocessing
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import LoadedProbe, loaded

pytestmark = pytest.mark.bpf

PATH_MAX, HOST_MAX, TP_MAX, TS_MAX = 128, 64, 56, 64
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789"
VALUE_CHARS = NAME_CHARS + " ./:;=,"


@dataclass(frozen=True)
class Exchange:
    request: bytes
    response: bytes
    # what the tracer must keep of them
    method: str
    path: str
    truncated: bool
    host: str
    traceparent: str
    tracestate: str
    status: int
    version_flag: int   # HttpFlag bit of the request line's version (0: neither 1.0 nor 1.1)


# request-line versions and the flag each must give; mostly 1.1, as real clients send
VERSIONS = {"HTTP/1.1": pb.HTTP_FLAG_HTTP_1_1, "HTTP/1.0": pb.HTTP_FLAG_HTTP_1_0, "HTTP/1.9": 0,
            "HTTP/2.0": 0, "HTTP/0.9": 0, "HTTP/1.x": 0}


def _word(rng: random.Random, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


def _mixed_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def _value(rng: random.Random, n: int) -> str:
    return _word(rng, VALUE_CHARS, n).strip(" ") or "v"


def exchange(rng: random.Random) -> Exchange:
    eol = "\n" if rng.random() < 0.15 else "\r\n"
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
    path = "/" + _word(rng, NAME_CHARS + "/.", rng.choice([0, 5, 7, 8, 9, 60, 119, 120, 121, 127, 128,
                                                           129, 135, 200]))
    target = path + (rng.choice(["?", "#"]) + _word(rng, VALUE_CHARS.replace(" ", ""), rng.randint(0, 40))
                     if rng.random() < 0.4 else "")
    host = _value(rng, rng.choice([1, 7, 8, 9, 15, 16, 17, 55, 56, 57, 63, 64, 65, 80]))
    tp = _value(rng, rng.choice([55, 48, 49, 56, 57, 70]))
    ts = _value(rng, rng.choice([1, 8, 40, 63, 64, 65, 90]))
    headers = [(_mixed_case(rng, "host"), " " * rng.randint(0, 3) + host)]
    if rng.random() < 0.7:
        headers.append((_mixed_case(rng, "traceparent"), " " + tp))
    if rng.random() < 0.5:
        headers.append((_mixed_case(rng, "tracestate"), " " + ts))
    for _ in range(rng.randint(0, 6)):
        name = _word(rng, NAME_CHARS, rng.choice([1, 4, 7, 8, 9, 11, 15, 16, 17, 23, 24, 25]))
        if name.lower() not in ("host", "traceparent", "tracestate", "content-length", "transfer-encoding"):
            headers.append((name, " " + _value(rng, rng.randint(0, 50))))
    rng.shuffle(headers)
    version = "HTTP/1.1" if rng.random() < 0.6 else rng.choice(list(VERSIONS))
    request = (f"{method} {target} {version}{eol}"
               + "".join(f"{k}:{v}{eol}" for k, v in headers) + eol).encode()

    status = rng.choice([200, 201, 404, 500, 302])
    body = _word(rng, VALUE_CHARS, rng.choice([0, 1, 9, 100, 3000]))
    reply = [(_mixed_case(rng, "content-length"), f" {len(body)}")]
    for _ in range(rng.randint(0, 7)):
        name = _word(rng, NAME_CHARS, rng.choice([1, 4, 7, 8, 9, 13, 15, 16, 17, 24, 25, 40]))
        if name.lower() not in ("content-length", "transfer-encoding"):
            reply.append((name, " " + _value(rng, rng.randint(0, 80))))
    rng.shuffle(reply)
    response = (f"HTTP/1.1 {status} {_word(rng, NAME_CHARS, rng.randint(1, 12))}{eol}"
                + "".join(f"{k}:{v}{eol}" for k, v in reply) + eol + body).encode()

    has_tp = any(k.lower() == "traceparent" for k, _ in headers)
    has_ts = any(k.lower() == "tracestate" for k, _ in headers)
    return Exchange(request, response, method, path[:PATH_MAX], len(path) > PATH_MAX, host[:HOST_MAX],
                    tp[:TP_MAX] if has_tp else "", ts[:TS_MAX] if has_ts else "", status, VERSIONS[version])


def send_in_pieces(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 64, 200, len(data)])
        sock.sendall(data[pos:pos + n])
        pos += n


def read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while (end := buf.find(marker)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return end


def run_exchanges(exchanges: list[Exchange], seed: int, port_out: multiprocessing.Queue[int]) -> None:
    """Child process: a raw server thread and a raw client on one keep-alive connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.put(listener.getsockname()[1])

    def serve() -> None:
        rng = random.Random(seed * 7 + 1)
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        for ex in exchanges:
            marker = b"\r\n\r\n" if ex.request.endswith(b"\r\n\r\n") else b"\n\n"
            end = read_until(conn, buf, marker)
            del buf[: end + len(marker)]
            send_in_pieces(conn, ex.response, rng)
        conn.close()

    server = threading.Thread(target=serve)
    server.start()
    rng = random.Random(seed * 7 + 2)
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    for ex in exchanges:
        send_in_pieces(client, ex.request, rng)
        # the whole response: its length is known from the script
        while len(buf) < len(ex.response):
            chunk = client.recv(65536)
            if not chunk:
                raise ConnectionError("server closed")
            buf += chunk
        del buf[: len(ex.response)]
    server.join()
    client.close()


@pytest.fixture(scope="module")
def probe() -> Iterator[LoadedProbe]:
    with loaded(HttpProbe()) as lp:
        yield lp


@pytest.fixture(autouse=True)
def _own_events_only(probe: LoadedProbe) -> None:
    """Each seed sees only its own records (a later seed's server may get an earlier one's port)."""
    probe.clear()


@pytest.mark.parametrize("seed", range(6))
def test_records_keep_what_a_byte_by_byte_reading_keeps(probe: LoadedProbe, seed: int) -> None:
    rng = random.Random(seed)
    exchanges = [exchange(rng) for _ in range(40)]
    ports: multiprocessing.Queue[int] = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=run_exchanges, args=(exchanges, seed, ports))
    child.start()
    port = ports.get(timeout=10)
    child.join(60)
    assert child.exitcode == 0

    def records(role: int) -> list[pb.HttpRequest]:
        def pick(events: list[pb.Event]) -> list[pb.HttpRequest]:
            return sorted((e.http for e in events if e.HasField("http") and e.http.role == role and
                           (e.http.tuple.local_port if role == pb.ROLE_SERVER else e.http.tuple.remote_port)
                           == port), key=lambda r: r.start_ns)

        probe.wait_for(lambda es: len(pick(es)) >= len(exchanges), 15)
        return pick(probe.snapshot())

    for role in (pb.ROLE_SERVER, pb.ROLE_CLIENT):
        got = records(role)
        assert len(got) == len(exchanges)
        for i, (ex, r) in enumerate(zip(exchanges, got, strict=True)):
            want = (ex.method, ex.path, ex.truncated, ex.host, ex.traceparent, ex.tracestate, ex.status,
                    ex.version_flag)
            seen = (r.method, r.path, bool(r.flags & pb.HTTP_FLAG_PATH_TRUNCATED), r.host, r.traceparent,
                    r.tracestate, r.status, r.flags & (pb.HTTP_FLAG_HTTP_1_0 | pb.HTTP_FLAG_HTTP_1_1))
            assert seen == want, f"seed {seed} exchange {i} role {role}: {ex.request!r} / {ex.response!r}"
            assert r.end_ns >= r.start_ns > 0 and not r.flags & pb.HTTP_FLAG_NO_RESPONSE
