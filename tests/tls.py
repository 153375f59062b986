"""TLS pieces for the security tests: a CA of the test's own with server and client
certificates (openssl), and a TLS terminator that puts TLS (and optionally a client
certificate check) in front of a plain TCP server.

    pki = TestPki.make(tmp_path)                    # pki.ca, pki.server, pki.client (cert, key)
    with TlsTerminator(pki, backend_port, require_client_cert=True) as tls:
        ...                                         # clients connect to 127.0.0.1:tls.port

The terminator exists because the local Kafka-protocol broker (Tansu) completes no TLS
handshake itself; Kafka's TLS is plain TLS around the protocol, so a broker that advertises
the terminator's address is, to a client, a broker that speaks only TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from infra.procs import free_port


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class CertPair(NamedTuple):
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPki:
    ca: CertPair
    server: CertPair      # for 127.0.0.1
    client: CertPair      # extendedKeyUsage clientAuth

    __test__ = False      # not a test class, whatever its name

    @classmethod
    def make(cls, where: Path) -> TestPki:
        where.mkdir(parents=True, exist_ok=True)
        ca = CertPair(where / "ca.crt", where / "ca.key")
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key),
                 "-out", str(ca.cert), "-days", "1", "-subj", "/CN=weft-test-ca")
        server = signed_pair(where, "srv", ca, "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n")
        client = signed_pair(where, "client", ca, "/CN=weft-client", "extendedKeyUsage=clientAuth\n")
        return cls(ca, server, client)


def signed_pair(where: Path, name: str, ca: CertPair, subject: str, ext: str) -> CertPair:
    """A new key and a certificate for it signed by `ca`, with the given extensions."""
    key, csr, cert, ext_file = (where / f"{name}.{n}" for n in ("key", "csr", "crt", "cnf"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject)
    ext_file.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext_file))
    return CertPair(cert, key)


class TlsTerminator:
    """Accepts TLS on 127.0.0.1:<port> (certificate `pki.server`; with require_client_cert a
    client certificate signed by `pki.ca` too) and relays the plain bytes to 127.0.0.1:backend.
    Runs its own event loop in a thread. `handshakes` counts the completed ones, `refused` the
    failed ones (a client that did not present what was required)."""

    def __init__(self, pki: TestPki, backend_port: int, *, require_client_cert: bool = False,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.handshakes = 0
        self.refused = 0
        self._backend = backend_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(pki.server.cert, pki.server.key)
        if require_client_cert:
            self._context.load_verify_locations(pki.ca.cert)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-terminator", daemon=True)
        self._server: asyncio.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        serving = asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self._server = self._loop.run_until_complete(serving)
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # TLS is started on the accepted connection (not by the server) so that a failed
        # handshake is seen here, and counted, instead of only in asyncio's debug log.
        try:
            await client_w.start_tls(self._context, ssl_handshake_timeout=10)
        except (TimeoutError, ssl.SSLError, OSError):
            self.refused += 1
            client_w.transport.abort()
            return
        self.handshakes += 1
        try:
            backend_r, backend_w = await asyncio.open_connection("127.0.0.1", self._backend)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("TLS terminator did not start")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.stop()
        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()
