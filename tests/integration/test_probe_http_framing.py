"""Message framing: interim (1xx) responses, several messages in one call, request bodies
(Content-Length and chunked), heads longer than the part of a call the kernel parses.

A client that sends `Expect: 100-continue` (curl for large uploads, .NET and Java clients by
default) sends its head, waits for `100 Continue`, then sends the body; the server's final
response follows. `103 Early Hints` carries headers of its own before the final response.
Pipelined answers can arrive in one read; a request body can share a send with the next
request, or read like a request line itself. Each case is scripted byte for byte between a raw
server and a raw client, followed by a request on the same keep-alive connection: both ends
must record every request with its final status, its own sequence number and times that
contain each other, and the next request must parse as usual.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
from collections.abc import Iterator
from multiprocessing.synchronize import Event as EventType

import pytest

from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.integration.test_probe_http import requests_on
from tests.integration.test_probe_http_other_protocols import Script, _recorded, converse

pytestmark = pytest.mark.bpf

UPLOAD_HEAD = (b"POST /upload HTTP/1.1\r\nHost: interim\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
# the same keep-alive connection's next request (converse() plays AFTER on a second connection)
NEXT = [("c", b"GET /next HTTP/1.1\r\nHost: interim\r\n\r\n"),
        ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")]


@pytest.fixture(scope="module")
def probe() -> Iterator[LoadedProbe]:
    with loaded(HttpProbe()) as lp:
        yield lp


def _check(probe: LoadedProbe, script: Script, expected: list[tuple[str, str, int]]) -> None:
    port = converse(script)
    servers, clients = _recorded(probe, port, len(expected) + 1)
    want = [*expected, ("GET", "/after", 200)]
    assert [(r.method, r.path, r.status) for r in servers] == want
    assert [(r.method, r.path, r.status) for r in clients] == want
    for s, c in zip(servers, clients, strict=True):
        assert s.tcp_seq == c.tcp_seq
        assert c.start_ns <= s.start_ns <= s.end_ns <= c.end_ns


def test_expect_100_continue_ends_at_the_final_response(probe: LoadedProbe) -> None:
    _check(probe, [("c", UPLOAD_HEAD), ("s", CONTINUE), ("c", b"hello"), ("s", CREATED), *NEXT],
           [("POST", "/upload", 201), ("GET", "/next", 200)])


def test_an_interim_and_the_final_response_in_one_write(probe: LoadedProbe) -> None:
    """A server that answers the head at once, 100 and final response in one send."""
    _check(probe, [("c", UPLOAD_HEAD + b"hello"), ("s", CONTINUE + CREATED), *NEXT],
           [("POST", "/upload", 201), ("GET", "/next", 200)])


def test_early_hints_with_headers_then_the_final_response(probe: LoadedProbe) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
    page = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nLink: </style.css>; rel=preload\r\n\r\npage"
    _check(probe, [("c", b"GET /page HTTP/1.1\r\nHost: interim\r\n\r\n"), ("s", hints), ("s", page), *NEXT],
           [("GET", "/page", 200), ("GET", "/next", 200)])


def test_a_refused_expectation_ends_the_request_and_its_body_still_follows(probe: LoadedProbe) -> None:
    """The server refuses the upload at its head (417). A client that keeps the connection sends
    the body all the same (the server reads it as the body: RFC 9110 10.1.1), then the next
    request."""
    refused = b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n"
    _check(probe, [("c", UPLOAD_HEAD), ("s", refused), ("c", b"HELLO"), *NEXT],
           [("POST", "/upload", 417), ("GET", "/next", 200)])


def test_several_interim_responses_before_the_final_one(probe: LoadedProbe) -> None:
    _check(probe, [("c", UPLOAD_HEAD), ("s", CONTINUE), ("c", b"hello"),
                   ("s", b"HTTP/1.1 102 Processing\r\n\r\n"), ("s", b"HTTP/1.1 102 Processing\r\n\r\n"),
                   ("s", CREATED), *NEXT],
           [("POST", "/upload", 201), ("GET", "/next", 200)])


def test_pipelined_responses_in_one_write(probe: LoadedProbe) -> None:
    """Two answers in one send (and, mostly, in one read on the client): each request gets its own."""
    _check(probe, [("c", b"GET /a HTTP/1.1\r\nHost: p\r\n\r\nGET /b HTTP/1.1\r\nHost: p\r\n\r\n"),
                   ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
                         b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"), *NEXT],
           [("GET", "/a", 200), ("GET", "/b", 404), ("GET", "/next", 200)])


def test_a_head_answer_then_the_next_in_one_write(probe: LoadedProbe) -> None:
    """A HEAD response's Content-Length announces a body that is not sent: the next response
    starts right after its headers."""
    _check(probe, [("c", b"HEAD /h HTTP/1.1\r\nHost: p\r\n\r\nGET /g HTTP/1.1\r\nHost: p\r\n\r\n"),
                   ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), *NEXT],
           [("HEAD", "/h", 200), ("GET", "/g", 200), ("GET", "/next", 200)])


def test_pipelined_requests_with_bodies_in_one_write(probe: LoadedProbe) -> None:
    """The request direction: a body in the same send as the next request's head."""
    two = (b"POST /a HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc"
           b"PUT /b HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\n\r\nwxyz")
    _check(probe, [("c", two), ("s", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
                   ("s", b"HTTP/1.1 204 No Content\r\n\r\n"), *NEXT],
           [("POST", "/a", 201), ("PUT", "/b", 204), ("GET", "/next", 200)])


# A body that reads like the start of a request line ("I " is a method token and a space):
# taken for a request, it left a bogus request that took the next response's status.
SENTENCE = b"I loved it. A GET is not a POST\r\n\r\n"
POST_SENTENCE = (b"POST /review HTTP/1.1\r\nHost: p\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(SENTENCE))
CREATED_EMPTY = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"


def test_a_body_like_a_request_line_in_the_head_s_write(probe: LoadedProbe) -> None:
    _check(probe, [("c", POST_SENTENCE + SENTENCE), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/review", 201), ("GET", "/next", 200)])


def test_a_body_like_a_request_line_in_writes_of_its_own(probe: LoadedProbe) -> None:
    _check(probe, [("c", POST_SENTENCE), ("c", SENTENCE[:2]), ("c", SENTENCE[2:]),
                   ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/review", 201), ("GET", "/next", 200)])


def test_a_body_that_ends_inside_the_next_request_s_write(probe: LoadedProbe) -> None:
    """The body's last bytes and the next (pipelined) request in one send."""
    second = b"DELETE /r/1 HTTP/1.1\r\nHost: p\r\n\r\n"
    _check(probe, [("c", POST_SENTENCE + SENTENCE[:5]), ("c", SENTENCE[5:] + second),
                   ("s", CREATED_EMPTY), ("s", b"HTTP/1.1 204 No Content\r\n\r\n"), *NEXT],
           [("POST", "/review", 201), ("DELETE", "/r/1", 204), ("GET", "/next", 200)])


def test_a_body_sent_after_an_early_answer_is_still_a_body(probe: LoadedProbe) -> None:
    """A server that answers before reading the body (a 404 for a POST to no such path), and
    the body, which reads like a request line, arriving after that answer."""
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    _check(probe, [("c", POST_SENTENCE), ("s", not_found), ("c", SENTENCE), *NEXT],
           [("POST", "/review", 404), ("GET", "/next", 200)])


def _held_open(ports: multiprocessing.Queue[int], release: EventType, path: str,
               sends: list[list[bytes]], reads: list[int]) -> None:
    """Child: one exchange, the server's response in `sends` (each a sendmsg of those buffers),
    read by the client in calls of the sizes in `reads` (MSG_WAITALL; empty: one call for all of
    it); then the connection kept open until the test has looked."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    size = sum(len(b) for buffers in sends for b in buffers)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1000)
            for buffers in sends:
                conn.sendmsg(buffers)
            release.wait(30)

    server = threading.Thread(target=serve)
    server.start()
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: v\r\n\r\n".encode())
        for n in reads or [size]:
            client.recv(n, socket.MSG_WAITALL)
        release.wait(30)
    server.join(10)


def _records_while_open(path: str, sends: list[list[bytes]], reads: list[int], probe: LoadedProbe,
                        roles: tuple[int, ...]) -> list[pb.HttpRequest]:
    """The records of `_held_open`'s exchange, each found while its connection is still open: a
    keep-alive connection may stay idle for minutes, and a span held that long misses its trace."""
    ctx = multiprocessing.get_context("fork")
    ports: multiprocessing.Queue[int] = ctx.Queue()
    release = ctx.Event()
    child = ctx.Process(target=_held_open, args=(ports, release, path, sends, reads))
    child.start()
    try:
        port = ports.get(timeout=10)
        records = [requests_on(probe, port, role, 1, timeout=5)[0] for role in roles]
        assert child.is_alive()     # the connection is still open
    finally:
        release.set()
        child.join(30)
    return records


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_chunked_response_written_as_vectors_ends_at_its_last_chunk(probe: LoadedProbe) -> None:
    """The head and chunks in one sendmsg, the last chunk alone at the end of another, as nginx
    writes them: the record leaves at the last chunk, not at the close."""
    sends = [[CHUNKED_HEAD, b"5\r\n", b"hello", b"\r\n"], [b"6\r\n world\r\n", b"0\r\n\r\n"]]
    server, client = _records_while_open("/vectors", sends, [], probe, (pb.ROLE_SERVER, pb.ROLE_CLIENT))
    assert (server.path, server.status, client.status) == ("/vectors", 200, 200)
    assert client.start_ns <= server.start_ns <= server.end_ns <= client.end_ns


# A load balancer that speaks the PROXY protocol (HAProxy, AWS NLB, ingress-nginx behind one)
# opens each connection with the client's address, before the first request.
PROXY_V1 = b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 80\r\n"
PROXY_V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" +          # v2 PROXY, TCP over IPv4
            bytes([203, 0, 113, 7, 10, 0, 0, 2]) + (51234).to_bytes(2, "big") + (80).to_bytes(2, "big"))
BEHIND = [("c", b"GET /behind HTTP/1.1\r\nHost: lb\r\n\r\n"),
          ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]


@pytest.mark.parametrize("header", [PROXY_V1, PROXY_V2], ids=["v1", "v2"])
def test_a_proxy_protocol_header_is_not_a_request(probe: LoadedProbe, header: bytes) -> None:
    """The header in the first request's send, then a request of its own: both are traced, with
    the sequence number of their own first byte on both ends."""
    first, answer = BEHIND
    _check(probe, [("c", header + first[1]), answer, *NEXT], [("GET", "/behind", 200), ("GET", "/next", 200)])


@pytest.mark.parametrize("header", [PROXY_V1, PROXY_V2], ids=["v1", "v2"])
def test_a_proxy_protocol_header_in_a_send_of_its_own(probe: LoadedProbe, header: bytes) -> None:
    _check(probe, [("c", header), *BEHIND, *NEXT], [("GET", "/behind", 200), ("GET", "/next", 200)])


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_a_chunked_end_split_between_two_reads_ends_the_response(probe: LoadedProbe, cut: int) -> None:
    """A chunked response in one write, read in two calls that split its last chunk `cut` bytes
    before the end."""
    response = CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n"
    (client,) = _records_while_open("/pieces", [[response]], [len(response) - cut, cut], probe,
                                    (pb.ROLE_CLIENT,))
    assert (client.path, client.status) == ("/pieces", 200)


# A chunked upload (Node's http.request written piece by piece, Go's client with a body of
# unknown length, curl -T -): its chunks are framed by size lines, and a read can start anywhere
# in a chunk's data.
CHUNKED_POST = b"POST /stream HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_chunked_request_body_like_a_request_line_in_sends_of_its_own(probe: LoadedProbe) -> None:
    """A chunk's data in a send of its own that reads like a request line: it must not become a
    request (its text would leave the kernel as a path), nor take the next request's place."""
    _check(probe, [("c", CHUNKED_POST), ("c", b"%x\r\n" % len(SENTENCE)), ("c", SENTENCE),
                   ("c", b"\r\n"), ("c", b"0\r\n\r\n"), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


def test_a_chunked_request_body_that_holds_a_whole_request(probe: LoadedProbe) -> None:
    """A chunk that carries an HTTP message of its own (a proxy's recording, a batch API), its
    last chunk and terminator split over sends."""
    inner = b"DELETE /inner HTTP/1.1\r\nHost: x\r\n\r\n"
    _check(probe, [("c", CHUNKED_POST + b"%x\r\n" % len(inner)), ("c", inner), ("c", b"\r\n0\r\n"),
                   ("c", b"\r\n"), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


def test_a_chunked_request_whole_in_one_send(probe: LoadedProbe) -> None:
    _check(probe, [("c", CHUNKED_POST + b"5\r\nhello\r\n0\r\n\r\n"), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


def test_after_a_chunked_request_answered_the_connection_goes_on(probe: LoadedProbe) -> None:
    """A request pipelined right behind a chunked body in the same send is not seen (the parser
    finds a chunked end only at the end of a call); once the chunked request is answered, the
    connection's next request is parsed as usual."""
    behind = b"GET /behind HTTP/1.1\r\nHost: p\r\n\r\n"
    _check(probe, [("c", CHUNKED_POST + b"5\r\nhello\r\n0\r\n\r\n" + behind), ("s", CREATED_EMPTY),
                   ("s", b"HTTP/1.1 204 No Content\r\n\r\n"), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


def test_a_chunked_request_body_after_an_early_answer_is_still_a_body(probe: LoadedProbe) -> None:
    """An upload refused at its head (a 401): the client sends its chunks all the same and the
    server reads them to keep the connection; they read like requests."""
    refused = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    _check(probe, [("c", CHUNKED_POST), ("s", refused), ("c", b"%x\r\n" % len(SENTENCE)), ("c", SENTENCE),
                   ("c", b"\r\n0\r\n\r\n"), *NEXT],
           [("POST", "/stream", 401), ("GET", "/next", 200)])


def test_a_chunked_request_in_one_vector_send(probe: LoadedProbe) -> None:
    """A client that writes head and chunks as one writev: its end is not looked for through the
    iovecs (the cost would fall on every vector send); the answer ends the body."""
    _check(probe, [("c", [CHUNKED_POST, b"5\r\n", b"hello", b"\r\n0\r\n\r\n"]), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


def test_chunks_in_vector_sends_of_their_own(probe: LoadedProbe) -> None:
    _check(probe, [("c", CHUNKED_POST), ("c", [b"%x\r\n" % len(SENTENCE), SENTENCE, b"\r\n"]),
                   ("c", [b"0\r\n", b"\r\n"]), ("s", CREATED_EMPTY), *NEXT],
           [("POST", "/stream", 201), ("GET", "/next", 200)])


# Heads longer than the 1 KiB the kernel parses of a call (cookies, security policies, tokens):
# the part past it is not parsed, and must not leave the connection's parser out of step.
LONG_VALUE = b"v" * 1500


def test_a_request_head_longer_than_the_window_then_the_next_request(probe: LoadedProbe) -> None:
    _check(probe, [("c", b"GET /long HTTP/1.1\r\nHost: p\r\nCookie: " + LONG_VALUE + b"\r\n\r\n"),
                   ("s", CREATED_EMPTY), *NEXT],
           [("GET", "/long", 201), ("GET", "/next", 200)])


def test_a_response_head_longer_than_the_window_with_its_body_then_the_next(probe: LoadedProbe) -> None:
    long_ok = (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Security-Policy: " + LONG_VALUE +
               b"\r\n\r\nbody")
    _check(probe, [("c", b"GET /long HTTP/1.1\r\nHost: p\r\n\r\n"), ("s", long_ok), *NEXT],
           [("GET", "/long", 200), ("GET", "/next", 200)])


def test_a_response_head_longer_than_the_window_then_its_body_then_the_next(probe: LoadedProbe) -> None:
    body = b"line one\n\nline two\r\n\r\nthree\n"
    long_head = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nSet-Cookie: %s\r\n\r\n" % (len(body), LONG_VALUE))
    _check(probe, [("c", b"GET /long HTTP/1.1\r\nHost: p\r\n\r\n"), ("s", long_head), ("s", body), *NEXT],
           [("GET", "/long", 200), ("GET", "/next", 200)])


def test_a_request_head_past_the_window_with_its_body_is_over_at_its_answer(probe: LoadedProbe) -> None:
    """Its Content-Length past the window too: where the head ends is not known; the answer
    shows it ended."""
    post = b"POST /long HTTP/1.1\r\nHost: p\r\nCookie: " + LONG_VALUE + b"\r\nContent-Length: 5\r\n\r\nhello"
    _check(probe, [("c", post), ("s", CREATED_EMPTY), *NEXT], [("POST", "/long", 201), ("GET", "/next", 200)])


def test_a_response_head_past_the_window_with_its_body_ends_at_the_next_request(probe: LoadedProbe) -> None:
    long_ok = b"HTTP/1.1 200 OK\r\nX-Policy: " + LONG_VALUE + b"\r\nContent-Length: 4\r\n\r\nbody"
    _check(probe, [("c", b"GET /long HTTP/1.1\r\nHost: p\r\n\r\n"), ("s", long_ok), *NEXT],
           [("GET", "/long", 200), ("GET", "/next", 200)])


def test_a_request_head_past_the_window_in_two_sends(probe: LoadedProbe) -> None:
    head = b"GET /long HTTP/1.1\r\nHost: p\r\nCookie: " + LONG_VALUE + b"\r\nAccept: */*\r\n\r\n"
    _check(probe, [("c", head[:1400]), ("c", head[1400:]), ("s", CREATED_EMPTY), *NEXT],
           [("GET", "/long", 201), ("GET", "/next", 200)])


@pytest.mark.parametrize("line", [b"HELLO /there friend\r\n", b"GET /x HTTX/1.1\r\nHost: p\r\n\r\n"],
                         ids=["text", "not-http-version"])
def test_a_line_without_an_http_version_is_not_a_request(probe: LoadedProbe, line: bytes) -> None:
    """A line that starts like a request but does not end in HTTP/ and a version (a text
    protocol on the port, a body the parser lost step with): nothing is recorded, and the next
    request is read."""
    _check(probe, [("c", line), *NEXT], [("GET", "/next", 200)])


LONG_BODY = b"x" * 3000   # ends past the 1 KiB the kernel parses of a call
LONG_POST = b"POST /long HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(LONG_BODY)
BEHIND_GET = b"GET /behind HTTP/1.1\r\nHost: p\r\n\r\n"
TWO_ANSWERS = [("s", CREATED_EMPTY), ("s", b"HTTP/1.1 204 No Content\r\n\r\n")]


def test_a_request_behind_a_long_body_in_the_head_s_send(probe: LoadedProbe) -> None:
    _check(probe, [("c", LONG_POST + LONG_BODY + BEHIND_GET), *TWO_ANSWERS, *NEXT],
           [("POST", "/long", 201), ("GET", "/behind", 204), ("GET", "/next", 200)])


def test_a_request_behind_a_long_body_in_a_send_of_its_own(probe: LoadedProbe) -> None:
    _check(probe, [("c", LONG_POST), ("c", LONG_BODY + BEHIND_GET), *TWO_ANSWERS, *NEXT],
           [("POST", "/long", 201), ("GET", "/behind", 204), ("GET", "/next", 200)])
