"""Real agents on test nodes publishing to a broker, for the fault tests and the soak.

    with AgentPipeline.start(tmp, bootstrap, topic, ["n0", "n1"]) as pipe:
        server = pipe.serve_http("n0", 8080)              # python http.server in node n0
        load = pipe.load("n1", pipe.url("n0", 8080), rps=40)   # tests/faults/loadgen.py in n1
        pipe.http_events()                                 # HTTP events the agents decoded

Each node is a netns + cgroup (infra.nodes); one `weft agent --cgroup <node cgroup>` per node
runs on the host with its Prometheus endpoint on a free loopback port, so what an agent
produced is read from its own counters. Everything started here is stopped by pid."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from infra.nodes import Node, NodeSet
from infra.procs import free_port
from weft.run import Child, spawn_agent, wait_agents

LOADGEN = Path(__file__).with_name("loadgen.py")


def agent_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an agent's /metrics: (name, sorted labels without node) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))
            out[(sample.name, labels)] = float(sample.value)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def held_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process `pid` holds open (from its fdinfo)."""
    ids: set[int] = set()
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # the fd closed while we looked
        ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("prog_id:"))
    return ids


@dataclass
class AgentPipeline:
    nodes: NodeSet
    agents: dict[str, Child]
    metrics_ports: dict[str, int]
    workdir: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    spawners: dict[str, Callable[[], Child]] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, bootstrap: str, topic: str, names: Sequence[str],
              extra_env: dict[str, str] | None = None) -> AgentPipeline:
        nodes = NodeSet(len(names), names=names)
        nodes.__enter__()
        agents: dict[str, Child] = {}
        ports: dict[str, int] = {}
        spawners: dict[str, Callable[[], Child]] = {}
        try:
            for node in nodes:
                ports[node.name] = free_port()
                env = {**os.environ, "WEFT_RUN_DIR": str(workdir / "run"), "WEFT_KAFKA_RAW_TOPIC": topic,
                       "WEFT_AGENT_METRICS_PORT": str(ports[node.name]), **(extra_env or {})}
                spawners[node.name] = functools.partial(spawn_agent, node.name, workdir / "logs",
                                                        cgroups=[node.cgroup], bootstrap=bootstrap, env=env)
                agents[node.name] = spawners[node.name]()
            wait_agents(list(agents.values()))
        except BaseException:
            for agent in agents.values():
                agent.stop(10)
            nodes.__exit__(None, None, None)
            raise
        return cls(nodes, agents, ports, workdir, spawners=spawners)

    def restart_agent(self, name: str) -> Child:
        """Start node `name`'s agent again (same node name, spool and metrics port)."""
        self.agents[name].stop(10)
        self.agents[name] = self.spawners[name]()
        wait_agents([self.agents[name]])
        return self.agents[name]

    def node(self, name: str) -> Node:
        return self.nodes.by_name(name)

    def url(self, name: str, port: int, path: str = "/") -> str:
        return f"http://{self.node(name).address}:{port}{path}"

    def serve_http(self, name: str, port: int) -> subprocess.Popen[bytes]:
        """A real HTTP server (Python's http.server, threading) in node `name`."""
        docroot = self.workdir / f"www-{name}"
        docroot.mkdir(exist_ok=True)
        (docroot / "index.html").write_text("weft fault test\n")
        proc = self.node(name).popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                      self.node(name).address, "--directory", str(docroot)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(proc)
        self._wait_serving(name, port)
        return proc

    def _wait_serving(self, name: str, port: int) -> None:
        """Until the server in node `name` answers on `port` (a refused connect is retried for
        20 s). Python, not curl: curl 7.88's retry loop here once died of SIGABRT (a fresh-clone
        run of test_kafka_tls)."""
        self.node(name).run([sys.executable, "-c", _WAIT_SERVING, self.url(name, port)], check=True)

    def serve_nginx(self, name: str, port: int) -> subprocess.Popen[bytes]:
        """nginx in node `name` answering 200 on every path (epoll, a large accept backlog:
        the server for thousands of hostile connections)."""
        prefix = self.workdir / f"nginx-{name}"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""daemon off;
worker_processes 1;
worker_rlimit_nofile 30000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 25000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {self.node(name).address}:{port} backlog=4096;
        location / {{ return 200 "weft fault test\\n"; }}
    }}
}}
""")
        proc = self.node(name).popen(["nginx", "-c", str(conf), "-p", str(prefix)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(proc)
        self._wait_serving(name, port)
        return proc

    def load(self, name: str, url: str, rps: float, *extra: str) -> subprocess.Popen[bytes]:
        """tests/faults/loadgen.py in node `name` until SIGTERM; it prints its request count."""
        proc = self.node(name).popen([sys.executable, str(LOADGEN), url, "--rps", str(rps), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.children.append(proc)
        return proc

    def metric(self, name: str, metric: str, **labels: str) -> float:
        return agent_metrics(self.metrics_ports[name]).get((metric, tuple(sorted(labels.items()))), 0.0)

    def http_events(self) -> int:
        """HTTP request events the agents decoded from the kernel (each becomes one span)."""
        return int(sum(self.metric(n, "weft_agent_events_total", kind="http") for n in self.agents))

    def agent_rss_mb(self) -> float:
        return max(rss_mb(a.proc.pid) for a in self.agents.values() if a.alive())

    def stop(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for agent in self.agents.values():
            agent.stop(30)
        self.nodes.__exit__(None, None, None)

    def __enter__(self) -> AgentPipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()



def topic_values(bootstrap: str, topic: str, enough: Callable[[list[bytes]], bool],
                 timeout_s: float = 30.0) -> list[bytes]:
    """Record values of `topic` from the beginning of every partition until `enough(values)`
    (agents publish watermarks all the time, so there is no end to wait for). Partitions are
    assigned directly: no consumer-group join to wait for."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"weft-fault-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, part, OFFSET_BEGINNING) for part in meta.partitions])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while not enough(values):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: what was wanted not found in {len(values)} records")
            values += [m.value() or b"" for m in consumer.consume(1000, timeout=0.5) if m.error() is None]
        return values
    finally:
        consumer.close()


# argv[1]: a URL; exits 0 once it answers 200, raises after 20 s of refused connects
_WAIT_SERVING = """
import sys, time, urllib.request
deadline = time.monotonic() + 20
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.02)
"""
