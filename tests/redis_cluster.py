"""A real Redis Cluster for tests: three primaries (Debian's redis-server, cluster mode) on free
loopback ports, the 16384 slots split between them, no replicas, no persistence, and a password
(`requirepass`, `masterauth`), so Weft's clients reach it only with the auth settings.

Set up with CLUSTER ADDSLOTSRANGE / CLUSTER MEET through redis-py rather than
`redis-cli --cluster create`, so it needs nothing beyond the redis-server package. With a
TestPki the nodes speak only TLS, to clients and on the cluster bus, and CLUSTER SLOTS
advertises their TLS ports, as a managed cluster with in-transit encryption does.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from infra.redis_server import HOST, redis_bin
from tests.tls import TestPki
from tests.workloads.servers import free_port
from weft.config import RedisSettings

SLOTS = 16384
PASSWORD = "cluster-auth-77c1"


@dataclass(frozen=True)
class LocalCluster:
    ports: list[int]          # the primaries' client ports; any one is a seed for clients
    password: str
    ca: Path | None = None    # TLS only, with a certificate signed by this CA

    @property
    def url(self) -> str:
        return f"{'rediss' if self.ca else 'redis'}://{HOST}:{self.ports[0]}/0"

    def settings(self, **overrides: Any) -> RedisSettings:
        """Weft's Redis settings for this cluster (the password as `redis.password`)."""
        tls = {"ssl_ca_certs": str(self.ca)} if self.ca else {}
        return RedisSettings(url=self.url, password=self.password, **tls, **overrides)

    def node(self, port: int, decode: bool = True) -> redis.Redis:
        """A plain client of one primary (keys it does not own answer MOVED)."""
        return _client(port, self.ca, decode=decode)

    def flush(self) -> None:
        """Empty every primary (a test's fresh, empty store)."""
        for port in self.ports:
            client = self.node(port)
            client.flushall()
            client.close()


def _client(port: int, ca: Path | None, decode: bool = False, timeout_s: float | None = None) -> redis.Redis:
    tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(ca)} if ca else {}
    return redis.Redis(host=HOST, port=port, password=PASSWORD, decode_responses=decode,
                       socket_timeout=timeout_s, **tls)


@contextmanager
def running_cluster(workdir: Path, primaries: int = 3, timeout_s: float = 20.0,
                    pki: TestPki | None = None) -> Iterator[LocalCluster]:
    """Start the cluster and yield it; stopped (exactly the processes started) on exit."""
    ca = pki.ca.cert if pki else None
    ports = [(free_port(HOST), free_port(HOST)) for _ in range(primaries)]  # (client, cluster bus)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port, bus in ports:
            node_dir = workdir / f"redis-cluster-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            listen = ["--port", str(port)] if pki is None else [
                "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
                "--tls-ca-cert-file", str(pki.ca.cert), "--tls-auth-clients", "no"]
            procs.append(subprocess.Popen(
                [redis_bin(), "--bind", HOST, *listen, "--cluster-enabled", "yes",
                 "--cluster-port", str(bus), "--cluster-config-file", str(node_dir / "nodes.conf"),
                 "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                 "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                 "--logfile", str(node_dir / "log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        clients = [_client(port, ca, timeout_s=5) for port, _ in ports]
        _until(lambda: all(_pings(c) for c in clients), timeout_s, procs, "cluster nodes did not start")
        share = SLOTS // primaries
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == primaries - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for port, bus in ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", HOST, port, bus)
        _until(lambda: all(_ready(c, primaries) for c in clients), timeout_s, procs, "cluster did not form")
        for client in clients:
            client.close()
        yield LocalCluster([port for port, _ in ports], PASSWORD, ca)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.AuthenticationError):
        return False


def _ready(client: redis.Redis, primaries: int) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(primaries)


def _until(check: Callable[[], bool], timeout_s: float, procs: list[subprocess.Popen[bytes]],
           what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{what}: a redis-server exited")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout_s:g} s")
