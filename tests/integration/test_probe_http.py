"""HTTP tracer on the real kernel: real servers, real clients, exact fields, client/server agreement."""

from __future__ import annotations

import http.client
import multiprocessing
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.probes.http import HttpProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.workloads.servers import HERE, Server, running

pytestmark = pytest.mark.bpf

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def probe() -> Iterator[LoadedProbe]:
    with loaded(HttpProbe()) as lp:
        yield lp


@pytest.fixture(autouse=True)
def _own_events_only(probe: LoadedProbe) -> None:
    """Each test sees only the records of its own traffic: the probe lives for the module, and
    a server's ephemeral port can be one an earlier test's server had (100 stale records of
    the keep-alive test once matched the scatter-gather test's port)."""
    probe.clear()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workloads")


def requests_on(
    probe: LoadedProbe, port: int, role: int, count: int, timeout: float = 15.0
) -> list[pb.HttpRequest]:
    """Wait for `count` HTTP records of `role` on connections to/from `port`, in start order."""

    def pick(events: list[pb.Event]) -> list[pb.HttpRequest]:
        out = []
        for e in events:
            if e.HasField("http") and e.http.role == role:
                port_seen = e.http.tuple.local_port if role == pb.ROLE_SERVER else e.http.tuple.remote_port
                if port_seen == port:
                    out.append(e.http)
        return sorted(out, key=lambda r: r.start_ns)

    probe.wait_for(lambda es: len(pick(es)) >= count, timeout)
    return pick(probe.snapshot())


def assert_pairs(servers: list[pb.HttpRequest], clients: list[pb.HttpRequest]) -> None:
    """Each client record has a server record with the mirrored tuple and the same seq."""
    by_key = {(s.tuple.remote_port, s.tcp_seq): s for s in servers}
    assert len(by_key) == len(servers), "two server records share a (port, seq)"
    for c in clients:
        assert c.has_seq
        s = by_key[(c.tuple.local_port, c.tcp_seq)]
        assert s.has_seq
        assert (s.tuple.local_addr, s.tuple.local_port) == (c.tuple.remote_addr, c.tuple.remote_port)
        assert (s.tuple.remote_addr, s.tuple.remote_port) == (c.tuple.local_addr, c.tuple.local_port)
        assert (s.method, s.path, s.host, s.status) == (c.method, c.path, c.host, c.status)
        assert c.start_ns <= s.start_ns <= s.end_ns <= c.end_ns


def in_child(fn: object, *args: object) -> None:
    """Run a Python client in a forked process: the test process is the 'agent', never traced."""
    proc = multiprocessing.get_context("fork").Process(target=fn, args=args)  # type: ignore[arg-type]
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, f"client process failed ({proc.exitcode})"


def keepalive_client(host: str, port: int, path: str, n: int) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for _ in range(n):
        conn.request("GET", path + "?n=1")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()


def concurrent_clients(host: str, port: int, clients: int, per_client: int) -> None:
    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for j in range(per_client):
            conn.request("GET", f"/c{i}/{j}")
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def curl(*args: str) -> None:
    subprocess.run(["curl", "-s", "-o", "/dev/null", "--fail-with-body", *args], check=False, timeout=30)


@pytest.mark.parametrize("kind", ["python", "go", "node", "nginx"])
def test_curl_each_server(probe: LoadedProbe, workdir: Path, kind: str) -> None:
    path = "/index.html" if kind == "nginx" else "/hello"
    with running(kind, workdir) as srv:
        curl(
            srv.url(f"{path}?user=secret#frag"),
            srv.url("/missing?x=1"),
            "-H",
            f"traceparent: {TRACEPARENT}",
            "-H",
            "tracestate: weft=1",
        )
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 2)
    assert [(s.method, s.path, s.status) for s in servers] == [("GET", path, 200), ("GET", "/missing", 404)]
    for s in servers:
        assert s.host == f"127.0.0.1:{srv.port}"
        assert s.traceparent == TRACEPARENT and s.tracestate == "weft=1"
        assert s.tuple.local_addr == socket.inet_aton("127.0.0.1")
        assert s.flags == pb.HTTP_FLAG_HTTP_1_1 and s.end_ns > s.start_ns
        if kind != "nginx":  # nginx serves from a worker process
            assert s.pid == srv.pid
    assert_pairs(servers, clients)


@pytest.mark.parametrize("kind", ["go", "node", "nginx"])
def test_a_chunked_upload_then_a_request_on_the_same_connection(
        probe: LoadedProbe, workdir: Path, kind: str) -> None:
    """curl streams 100 KB of text as a chunked body; the server's reads start anywhere in its
    chunks, and the text reads like request lines. Go and nginx answer before reading the body
    (nginx: 404 for a POST to a file), then read it to keep the connection."""
    upload = workdir / "upload.txt"
    upload.write_bytes(b"GET PUT I loved it. " * 5000)
    path = "/index.html" if kind == "nginx" else "/hello"
    with running(kind, workdir) as srv:
        curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", srv.url("/upload"),
             "--next", "-s", "-o", "/dev/null", srv.url(path))
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 2)
        time.sleep(0.3)   # nothing more may come
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
    want = [("POST", "/upload", 404 if kind == "nginx" else 200), ("GET", path, 200)]
    assert [(s.method, s.path, s.status) for s in servers] == want
    assert [(c.method, c.path, c.status) for c in clients] == want
    assert_pairs(servers, clients)


@pytest.mark.parametrize(
    ("kind", "client"), [("python", "node"), ("go", "python"), ("node", "python"), ("nginx", "python")]
)
def test_keepalive_100_requests_other_language_client(
    probe: LoadedProbe, workdir: Path, kind: str, client: str
) -> None:
    path = "/index.html" if kind == "nginx" else "/k"
    with running(kind, workdir) as srv:
        if client == "node":
            out = subprocess.run(
                ["node", str(HERE / "node_client.js"), srv.host, str(srv.port), path, "100"],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            assert out.split() == ["200"] * 100
        else:
            in_child(keepalive_client, srv.host, srv.port, path, 100)
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 100)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 100)
    assert len(servers) == 100 and len(clients) == 100
    assert len({s.tuple.remote_port for s in servers}) == 1, "all on one keep-alive connection"
    assert all((s.method, s.path, s.status) == ("GET", path, 200) for s in servers)
    seqs = [s.tcp_seq for s in servers]
    assert len(set(seqs)) == 100
    assert_pairs(servers, clients)


def test_64_concurrent_clients(probe: LoadedProbe, workdir: Path) -> None:
    with running("go", workdir) as srv:
        in_child(concurrent_clients, srv.host, srv.port, 64, 5)
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 320)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 320)
    assert sorted(s.path for s in servers) == sorted(f"/c{i}/{j}" for i in range(64) for j in range(5))
    assert_pairs(servers, clients)


def raw_exchange(srv: Server, chunks: list[bytes], responses: int) -> None:
    """In a child process: send `chunks` as separate writes (TCP_NODELAY), read `responses` replies."""
    in_child(_raw_exchange, srv.host, srv.port, chunks, responses)


def _raw_exchange(host: str, port: int, chunks: list[bytes], responses: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((host, port))
        for chunk in chunks:
            s.sendall(chunk)
        data = b""
        s.settimeout(10)
        while data.count(b"ok /") < responses:  # whole responses: bodies are "ok <path>"
            more = s.recv(65536)
            if not more:
                break
            data += more


def test_pipelined_requests(probe: LoadedProbe, workdir: Path) -> None:
    with running("go", workdir) as srv:
        req = "GET /p{} HTTP/1.1\r\nHost: pipe\r\n\r\n"
        raw_exchange(srv, [b"".join(req.format(i).encode() for i in range(3))], 3)
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 3)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 3)
    assert [(s.path, s.host, s.status) for s in servers] == [(f"/p{i}", "pipe", 200) for i in range(3)]
    assert [s.flags & pb.HTTP_FLAG_PIPELINED for s in servers] == [
        0,
        pb.HTTP_FLAG_PIPELINED,
        pb.HTTP_FLAG_PIPELINED,
    ]
    first = servers[0].tcp_seq
    sizes = [len(req.format(i)) for i in range(3)]
    assert [s.tcp_seq for s in servers] == [first, first + sizes[0], first + sizes[0] + sizes[1]]
    assert [c.tcp_seq for c in clients] == [s.tcp_seq for s in servers]


def test_request_split_byte_by_byte(probe: LoadedProbe, workdir: Path) -> None:
    with running("python", workdir) as srv:
        req = f"GET /split?q=1 HTTP/1.1\r\nHost: bytes\r\ntraceparent: {TRACEPARENT}\r\n\r\n".encode()
        raw_exchange(srv, [req[i : i + 1] for i in range(len(req))], 1)
        old = b"GET /old HTTP/1.0\r\n\r\n"
        raw_exchange(srv, [old[i : i + 1] for i in range(len(old))], 1)
        server, server_old = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
        client, client_old = requests_on(probe, srv.port, pb.ROLE_CLIENT, 2)
    # the version, byte by byte too
    assert server.flags == client.flags == pb.HTTP_FLAG_HTTP_1_1
    assert (server_old.path, server_old.flags, client_old.flags) == (
        "/old", pb.HTTP_FLAG_HTTP_1_0, pb.HTTP_FLAG_HTTP_1_0)
    assert (server.method, server.path, server.host, server.traceparent, server.status) == (
        "GET",
        "/split",
        "bytes",
        TRACEPARENT,
        200,
    )
    assert_pairs([server, server_old], [client, client_old])


@pytest.mark.parametrize("kind", ["python", "go", "node", "nginx"])
def test_16k_header_then_the_next_request(probe: LoadedProbe, workdir: Path, kind: str) -> None:
    """Heads far past the 1 KiB the kernel parses (a cookie jar, a JWT), twice on one keep-alive
    connection: the second request is traced like the first. 16 KiB of header (12 KiB for Node,
    whose whole head must stay under 16 KiB)."""
    path = "/index.html" if kind == "nginx" else "/big"
    size = 12288 if kind == "node" else 16384
    with running(kind, workdir) as srv:
        curl(srv.url(path), srv.url(path + "?again"), "-H", f"traceparent: {TRACEPARENT}",
             "-H", "X-Big: " + "b" * size)
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 2)
    for server in servers:
        assert (server.path, server.host, server.traceparent, server.status) == (
            path, f"127.0.0.1:{srv.port}", TRACEPARENT, 200)
    assert_pairs(servers, clients)


def test_non_http_bytes_then_http(probe: LoadedProbe, workdir: Path) -> None:
    with running("python", workdir) as srv:
        raw_exchange(srv, [b"\x16\x03\x01 not http at all\r\n\r\n"], 1)  # python answers 400
        curl(srv.url("/after"))
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 1)
    time.sleep(0.2)  # nothing more may arrive for the junk connection
    servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 1)
    assert [(s.method, s.path, s.status) for s in servers] == [("GET", "/after", 200)]


def test_ipv6_loopback(probe: LoadedProbe, workdir: Path) -> None:
    with running("go", workdir, host="::1") as srv:
        curl(srv.url("/six"))
        (server,) = requests_on(probe, srv.port, pb.ROLE_SERVER, 1)
        (client,) = requests_on(probe, srv.port, pb.ROLE_CLIENT, 1)
    assert server.tuple.local_addr == socket.inet_pton(socket.AF_INET6, "::1")
    assert (server.path, server.host, server.status) == ("/six", f"[::1]:{srv.port}", 200)
    assert_pairs([server], [client])


def test_an_ipv4_client_of_a_dual_stack_server_names_one_tuple(probe: LoadedProbe, workdir: Path) -> None:
    """A listener on "::" (Go's and Node's ":8080") accepts IPv4 too; on its side the kernel
    names such a connection's addresses IPv4-mapped (::ffff:127.0.0.1), while the client's
    socket is plain IPv4. Both ends' records name it as IPv4: one tuple per connection, as a
    cross-node hop needs to be told from NAT, and addresses that read as the IPv4 they are."""
    with running("go", workdir, host="::") as srv:
        curl(f"http://127.0.0.1:{srv.port}/dual")
        (server,) = requests_on(probe, srv.port, pb.ROLE_SERVER, 1)
        (client,) = requests_on(probe, srv.port, pb.ROLE_CLIENT, 1)
    loopback = socket.inet_aton("127.0.0.1")
    assert server.tuple.local_addr == server.tuple.remote_addr == loopback
    assert (server.tuple.local_addr, server.tuple.local_port, server.tuple.remote_addr,
            server.tuple.remote_port) == (client.tuple.remote_addr, client.tuple.remote_port,
                                          client.tuple.local_addr, client.tuple.local_port)
    assert_pairs([server], [client])


def test_connection_open_close_and_own_traffic_ignored(probe: LoadedProbe, workdir: Path) -> None:
    with running("go", workdir) as srv:
        curl(srv.url("/oc"))
        requests_on(probe, srv.port, pb.ROLE_SERVER, 1)

        def conn_events(es: list[pb.Event]) -> list[pb.Event]:
            return [
                e
                for e in es
                if (e.HasField("conn_open") and e.conn_open.tuple.local_port == srv.port)
                or (e.HasField("conn_close") and e.conn_close.tuple.local_port == srv.port)
            ]

        # the harness's own pid is the agent's: its connection (wait_port's probe) is not traced either
        events = probe.wait_for(lambda es: len([e for e in conn_events(es) if e.HasField("conn_close")]) >= 2)
    (req,) = requests_on(probe, srv.port, pb.ROLE_SERVER, 1)
    curl_port = req.tuple.remote_port
    opens = [
        e.conn_open
        for e in conn_events(events)
        if e.HasField("conn_open") and e.conn_open.tuple.remote_port == curl_port
    ]
    closes = [
        e.conn_close
        for e in conn_events(events)
        if e.HasField("conn_close") and e.conn_close.tuple.remote_port == curl_port
    ]
    assert (
        len(opens) == 1 and len(closes) == 1 and opens[0].role == pb.ROLE_SERVER and opens[0].pid == srv.pid
    )
    assert closes[0].sock_cookie == opens[0].sock_cookie and closes[0].bytes_received > 0
    own = [e for e in events if e.HasField("http") and e.http.pid == probe.ctx.self_pid]
    assert own == []


def _exit_without_close(host: str, port: int) -> None:
    """A keep-alive request whose response is not read, then exit: the kernel closes the socket,
    no close() of the process does."""
    import os

    s = socket.create_connection((host, port))
    s.sendall(b"GET /no-close HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(65536)
    os._exit(0)


def test_a_socket_closed_by_process_exit_is_forgotten_and_flushed(probe: LoadedProbe, workdir: Path) -> None:
    """The TCP state change to CLOSE ends a connection the process never close()d: its record is
    emitted and its state dropped (a later sock at the same address must not inherit it)."""
    with running("go", workdir) as srv:
        in_child(_exit_without_close, srv.host, srv.port)
        (client,) = requests_on(probe, srv.port, pb.ROLE_CLIENT, 1)
        closes = probe.wait_for(lambda es: any(
            e.HasField("conn_close") and e.conn_close.sock_cookie == client.sock_cookie for e in es))
    (close,) = [e.conn_close for e in closes if e.HasField("conn_close")
                and e.conn_close.sock_cookie == client.sock_cookie]
    assert close.role == pb.ROLE_CLIENT and close.pid == client.pid and close.bytes_received > 0
    assert client.status == 200 and client.path == "/no-close"


def _serve_without_answering(listener: socket.socket) -> None:
    """Read one request, wait a little, close without a response (a server giving up)."""
    conn, _ = listener.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    time.sleep(0.05)
    conn.close()


def _ask_and_wait_for_eof(host: str, port: int) -> None:
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536) == b""          # closed, nothing answered


def test_a_request_closed_before_its_response_ends_at_the_close_flagged(probe: LoadedProbe) -> None:
    """Both sides see a request and then the connection's end with no status line: each record
    is emitted at the close, ending there, flagged NO_RESPONSE (the caller waited that long; the
    stitcher exports it as a failed span), with the same seq on both sides."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = multiprocessing.get_context("fork").Process(target=_serve_without_answering, args=(listener,))
    server.start()
    before = time.time_ns()
    in_child(_ask_and_wait_for_eof, "127.0.0.1", port)
    server.join(10)
    listener.close()
    assert server.exitcode == 0
    (srv,) = requests_on(probe, port, pb.ROLE_SERVER, 1)
    (cli,) = requests_on(probe, port, pb.ROLE_CLIENT, 1)
    for r in (srv, cli):
        assert (r.method, r.path, r.status) == ("GET", "/gone", 0)
        assert r.flags & pb.HTTP_FLAG_NO_RESPONSE
        # ends at the close, after the server's 50 ms pause, not at 0 (which the stitcher refused)
        assert before < r.start_ns and r.start_ns + 40_000_000 < r.end_ns < time.time_ns()
    assert srv.has_seq and cli.has_seq and srv.tcp_seq == cli.tcp_seq


def _serve_after_reset(listener: socket.socket) -> None:
    """Accept, let the client's reset arrive, then read what it had sent (still queued)."""
    conn, _ = listener.accept()
    time.sleep(0.3)
    assert conn.recv(65536).startswith(b"GET /reset")


def test_a_read_after_a_reset_leaves_no_connection_state(probe: LoadedProbe) -> None:
    """A sock already CLOSEd (a reset) can still hand queued bytes to a read; it is unhashed (port
    0) and will see no further CLOSE, so no state may be made for it: a later connection at the
    same sock address would inherit it (seen as a whole connection's records with port 0)."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = multiprocessing.get_context("fork").Process(target=_serve_after_reset, args=(listener,))
    server.start()
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    server.join(10)
    assert server.exitcode == 0
    listener.close()
    conns = probe.bpf[b"conns"]
    assert not [v for v in conns.values() if v.t.lport == 0], "state kept for an unhashed sock"


def _scatter_gather_client(host: str, port: int) -> None:
    """sendmsg/recvmsg, then writev/readv (os.*v on the socket fd): requests split across iovecs."""
    import os

    with socket.create_connection((host, port)) as s:
        s.sendmsg(
            [
                b"GET /msg?secret=1 HTTP/1.1\r\n",
                b"Host: iov\r\n",
                b"traceparent: " + TRACEPARENT.encode(),
                b"\r\n\r\n",
            ]
        )
        data = b""
        while b"ok /msg" not in data:
            data += s.recvmsg(65536)[0]
        os.writev(s.fileno(), [b"GET /vec HTTP/1.1\r\n", b"Host: vec\r\n\r\n"])
        data = b""
        while b"ok /vec" not in data:
            buf = bytearray(65536)
            got = os.readv(s.fileno(), [buf])
            data += bytes(buf[:got])


def test_sendmsg_recvmsg_writev_readv(probe: LoadedProbe, workdir: Path) -> None:
    with running("go", workdir) as srv:
        in_child(_scatter_gather_client, srv.host, srv.port)
        clients = requests_on(probe, srv.port, pb.ROLE_CLIENT, 2)
        servers = requests_on(probe, srv.port, pb.ROLE_SERVER, 2)
    assert [(c.method, c.path, c.host, c.status) for c in clients] == [
        ("GET", "/msg", "iov", 200),
        ("GET", "/vec", "vec", 200),
    ]
    assert clients[0].traceparent == TRACEPARENT
    assert_pairs(servers, clients)


_PAUSE_S = 0.05  # between body writes: the request must end at the last one, not the headers
_FRAMED = {
    "/cl": [b"HTTP/1.1 200 OK\r\nContent-Length: 30000\r\n\r\n", b"a" * 10000, b"b" * 10000, b"c" * 10000],
    "/ch": [b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n",
            b"6\r\n world\r\n", b"0\r\n\r\n"],
    "/after": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
}


def _framing_server(listener: socket.socket) -> None:
    """Answer three requests on one connection, each response in separate writes with pauses."""
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        for _ in _FRAMED:
            while b"\r\n\r\n" not in pending:
                pending += conn.recv(4096)
            head, pending = pending.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1].decode()
            for i, part in enumerate(_FRAMED[path]):
                if i:
                    time.sleep(_PAUSE_S)
                conn.sendall(part)


def _framing_client(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in _FRAMED:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
    conn.close()


def test_response_bodies_in_several_writes_end_at_their_last_byte(probe: LoadedProbe) -> None:
    # Content-Length and chunked bodies arrive in several writes/reads after their headers:
    # the record ends at the call that moved the last body byte (a pause before each), and
    # the next request on the connection is a record of its own.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    server = ctx.Process(target=_framing_server, args=(listener,))
    server.start()
    listener.close()
    try:
        in_child(_framing_client, port)
    finally:
        server.join(10)
    assert server.exitcode == 0
    servers = requests_on(probe, port, pb.ROLE_SERVER, 3)
    clients = requests_on(probe, port, pb.ROLE_CLIENT, 3)
    assert [(s.path, s.status, s.flags) for s in servers] == [
        ("/cl", 200, pb.HTTP_FLAG_HTTP_1_1),
        ("/ch", 201, pb.HTTP_FLAG_HTTP_1_1),
        ("/after", 200, pb.HTTP_FLAG_HTTP_1_1),
    ]
    pause_ns = int(_PAUSE_S * 1e9)
    for s, c in zip(servers[:2], clients[:2], strict=True):
        assert s.end_ns - s.start_ns >= 3 * pause_ns  # three pauses: ended at the last write
        assert c.end_ns - c.start_ns >= 3 * pause_ns
    assert servers[2].end_ns - servers[2].start_ns < pause_ns
    assert servers[0].end_ns <= servers[1].start_ns and servers[1].end_ns <= servers[2].start_ns
    assert_pairs(servers, clients)
