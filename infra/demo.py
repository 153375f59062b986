"""The demo application on test nodes: place its services, start and stop them, drive traffic,
and turn the services' own truth logs into `weft verify`'s truth.

    with NodeSet(3, router=True) as nodes:
        app = DemoApp(nodes, work_dir)
        app.start()
        result = app.drive(concurrency=8, requests=40)
        truth = build_truth(app.truth_rows(), spans)   # spans: stitched JsonSpans

Topology (6 services, 3 languages, 3 nodes; the driver runs on n2 with a keep-alive pool):

    driver(n2) → front(py,n0) ┬→ catalog(go,n1) ─goroutine→ VIP → pricing(py,n2)    [NAT hop]
                  (fan-out:   └→ cart(node,n2) → stock(go,n1) → ledger(py,n0)        [chain of 4]
                  spawned threads, in parallel)

Every call carries a unique request id in its path (/<service>/r-<rid>, the callee's rid is the
caller's plus ".<callee>"), so a client span and the server span of one call share it. Each
service logs {rid, parent_rid, role, service, hop} (tests/workloads/demo/truth_log.py); the hop
type of each edge is known by construction (how the call was made, or how it travelled).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.nodes import Node, NodeSet

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "tests" / "workloads" / "demo"
VIP_PORT = 9003
ENTRY = "front"
DRIVER_NODE = 2


@dataclass(frozen=True)
class Call:
    to: str
    mode: str            # "thread" | "spawn" (new thread) | "goroutine" (new goroutine)
    via_vip: bool = False


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    lang: str            # "python" | "go" | "node"
    node: int            # index into the NodeSet
    port: int
    calls: tuple[Call, ...] = ()


# What each demo service says of itself, as an SDK would read it; Weft puts it on their spans.
DEMO_RESOURCE = "service.namespace=weft-demo,deployment.environment.name=demo"
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("front", "python", 0, 8001, (Call("catalog", "spawn"), Call("cart", "spawn"))),
    ServiceSpec("catalog", "go", 1, 8002, (Call("pricing", "goroutine", via_vip=True),)),
    ServiceSpec("pricing", "python", 2, 8003),
    ServiceSpec("cart", "node", 2, 8004, (Call("stock", "thread"),)),
    ServiceSpec("stock", "go", 1, 8005, (Call("ledger", "thread"),)),
    ServiceSpec("ledger", "python", 0, 8006),
)
# The hop types the demo exercises (verify's names): the client side of each call, by how it
# was made; the server side, by how the request travelled; the driver's requests are roots.
HOP_TYPES = ("cross_node", "goroutine", "nat", "root", "spawned_thread", "thread")


class DemoError(RuntimeError):
    """The demo could not start or its traffic failed; the message says which service and why."""


def _env() -> dict[str, str]:
    """The services' environment: the repository importable (tests.workloads.demo), unbuffered."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def spec(name: str) -> ServiceSpec:
    return next(s for s in SERVICES if s.name == name)


def spans_per_root() -> int:
    """Spans one root request makes: a client and a server span per call, plus the root's."""
    def calls_below(name: str) -> int:
        return sum(1 + calls_below(c.to) for c in spec(name).calls)
    return 2 * (1 + calls_below(ENTRY))


def build_go(out_dir: Path) -> Path:
    """`go build` the Go service (stdlib only, no module downloads) into out_dir."""
    out = out_dir / "demo_go_service"
    if out.exists():
        return out
    # The default GOCACHE (~/.cache/go-build) is shared between runs: net/http compiles once.
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    result = subprocess.run(["go", "build", "-o", str(out), str(DEMO_DIR / "go_service.go")],
                            capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise DemoError(f"go build of the demo service failed: {result.stderr.strip()}")
    return out


@dataclass
class DriveResult:
    sent: int
    ok: int
    failed: int
    seconds: float
    run_id: str


@dataclass
class DemoApp:
    nodes: NodeSet
    work_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    vip: str = ""
    _runs: int = 0

    @property
    def truth_dir(self) -> Path:
        return self.work_dir / "truth"

    def address(self, name: str) -> str:
        s = spec(name)
        return f"{self.nodes[s.node].address}:{s.port}"

    def node_of(self, service: str) -> str:
        """The name of the node a service (or "driver") runs on."""
        return self.nodes[DRIVER_NODE if service == "driver" else spec(service).node].name

    def _config(self, s: ServiceSpec) -> str:
        calls = [{"to": c.to, "mode": c.mode, "addr": self.vip if c.via_vip else self.address(c.to),
                  "hop": "nat" if c.via_vip else "cross_node"} for c in s.calls]
        return json.dumps({"service": s.name, "listen": f"{self.nodes[s.node].address}:{s.port}",
                           "truth": str(self.truth_dir / f"{s.name}.jsonl"), "calls": calls})

    def _argv(self, s: ServiceSpec, go_binary: Path) -> list[str]:
        if s.lang == "python":
            return [sys.executable, "-m", "tests.workloads.demo.py_service", self._config(s)]
        if s.lang == "go":
            return [str(go_binary), self._config(s)]
        return ["node", str(DEMO_DIR / "node_service.js"), self._config(s)]

    def start(self) -> None:
        """Start every service in its node (its own OTEL_SERVICE_NAME) and wait until all listen."""
        if self.nodes.router is None:
            raise DemoError("the demo needs NodeSet(..., router=True) for its NAT hop")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.truth_dir.mkdir(exist_ok=True)
        go_binary = build_go(self.work_dir)
        pricing = spec("pricing")
        self.vip = self.nodes.expose(VIP_PORT, self.nodes[pricing.node], pricing.port)
        for s in SERVICES:
            log = open(self.work_dir / f"{s.name}.log", "wb")  # noqa: SIM115 - the child owns it
            env = {**_env(), "OTEL_SERVICE_NAME": s.name, "OTEL_RESOURCE_ATTRIBUTES": DEMO_RESOURCE}
            self.procs[s.name] = self.nodes[s.node].popen(self._argv(s, go_binary), stdout=log,
                                                          stderr=subprocess.STDOUT, env=env)
            log.close()
        for node_index in sorted({s.node for s in SERVICES}):
            ports = [s.port for s in SERVICES if s.node == node_index]
            self._wait_listening(self.nodes[node_index], ports)
        # The VIP answers only once the router's DNAT and the backend are both up.
        self._wait_listening(self.nodes[DRIVER_NODE], [VIP_PORT], host=self.vip.rsplit(":", 1)[0])
        logger.info("demo services up: %s; VIP %s → pricing",
                    ", ".join(f"{s.name}@{self.nodes[s.node].name}" for s in SERVICES), self.vip)

    def _wait_listening(self, node: Node, ports: Sequence[int], host: str = "",
                        timeout_s: float = 20.0) -> None:
        """Poll a TCP connect from inside `node` (the host cannot reach the bridge) until each
        port answers. A bare connect makes no HTTP request, so it adds no span."""
        script = ("import socket,sys,time\n"
                  "host=sys.argv[1]; deadline=time.monotonic()+float(sys.argv[2])\n"
                  "for port in map(int, sys.argv[3:]):\n"
                  "    while True:\n"
                  "        try:\n"
                  "            socket.create_connection((host, port), 0.2).close(); break\n"
                  "        except OSError:\n"
                  "            if time.monotonic() > deadline: sys.exit(f'port {port} not listening')\n"
                  "            time.sleep(0.05)\n")
        result = node.run([sys.executable, "-c", script, host or node.address, str(timeout_s),
                           *map(str, ports)], timeout=timeout_s + 10)
        if result.returncode != 0:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            logs = {n: (self.work_dir / f"{n}.log").read_text(errors="replace")[-400:] for n in dead}
            raise DemoError(f"demo services not reachable on {node.name}: {result.stderr.strip()}; "
                            f"exited: {dead or 'none'} {logs or ''}")

    def _driver_config(self, concurrency: int, requests: int, seconds: float, rps: float) -> str:
        self._runs += 1
        run_id = f"{os.getpid():x}{self._runs}{time.time_ns() % 100_000:05d}"
        return json.dumps({"target": self.address(ENTRY), "entry": ENTRY, "run": run_id,
                           "truth": str(self.truth_dir / "driver.jsonl"), "concurrency": concurrency,
                           "requests": requests, "seconds": seconds, "rps": rps})

    def start_driver(self, *, concurrency: int, requests: int = 0, seconds: float = 3600,
                     rps: float = 0) -> tuple[subprocess.Popen[str], str]:
        """Start the traffic in the background; (process, run id). End it with SIGTERM."""
        config = self._driver_config(concurrency, requests, seconds, rps)
        env = {**_env(), "OTEL_SERVICE_NAME": "driver"}
        proc = self.nodes[DRIVER_NODE].popen([sys.executable, "-m", "tests.workloads.demo.driver", config],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env=env)
        return proc, json.loads(config)["run"]

    @staticmethod
    def finish_driver(proc: subprocess.Popen[str], run_id: str, timeout_s: float = 60) -> DriveResult:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0 or not out.strip():
            raise DemoError(f"the demo driver failed ({proc.returncode}): {err.strip()[-800:]}")
        summary = json.loads(out.strip().splitlines()[-1])
        return DriveResult(summary["sent"], summary["ok"], summary["failed"], summary["seconds"], run_id)

    def drive(self, *, concurrency: int, requests: int = 0, seconds: float = 3600,
              rps: float = 0) -> DriveResult:
        """Send root requests from the driver node and wait until they are all answered."""
        proc, run_id = self.start_driver(concurrency=concurrency, requests=requests, seconds=seconds,
                                         rps=rps)
        return self.finish_driver(proc, run_id, timeout_s=seconds + 120 if seconds < 3600 else 600)

    def truth_rows(self, run_id: str | None = None) -> list[dict[str, str]]:
        """Every truth row written so far (only those of one driver run when run_id is given)."""
        rows: list[dict[str, str]] = []
        for path in sorted(self.truth_dir.glob("*.jsonl")):
            with open(path) as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
        if run_id is not None:
            rows = [r for r in rows if r["rid"].startswith(f"{run_id}-")]
        return rows

    def stop(self) -> None:
        """Stop the services this object started (the NodeSet teardown also kills leftovers)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


# ------------------------------------------------------------------------------------- truth


def check_rows(rows: Iterable[dict[str, str]]) -> list[str]:
    """What is inconsistent in the services' own truth logs (each call logged once by both
    sides, each server's parent rid the one its caller logged); empty when all is well."""
    problems: list[str] = []
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        key = (row["role"], row["rid"])
        if key in seen:
            problems.append(f"{row['role']} {row['rid']} logged twice")
        seen[key] = row
    for (role, rid), row in seen.items():
        if role == "server":
            client = seen.get(("client", rid))
            if client is None:
                problems.append(f"server {rid} ({row['service']}) has no client row")
            elif client["parent_rid"] != row["parent_rid"]:
                problems.append(f"server {rid}: x-truth-parent {row['parent_rid']!r} but the caller "
                                f"logged {client['parent_rid']!r}")
        elif ("server", rid) not in seen:
            problems.append(f"client {rid} ({row['service']}) has no server row")
        elif row["parent_rid"] and ("server", row["parent_rid"]) not in seen:
            problems.append(f"client {rid} names parent {row['parent_rid']} that no server logged")
    return problems


def _span_key(kind: str, path: str) -> tuple[str, str] | None:
    """("server"|"client", rid) of a stitched span from its kind and url.path; None if not demo."""
    _, _, rid = path.partition("/r-")
    if not rid or kind not in ("SERVER", "CLIENT"):
        return None
    return kind.lower(), rid


def build_truth(rows: Iterable[dict[str, str]], spans: Iterable[Any]) -> list[dict[str, str]]:
    """verify's truth ({span, parent, hop} with hex ids) from the truth rows and the stitched
    spans (objects with .kind, .span_id and .attributes["url.path"], e.g. JsonSpan).

    A span Weft did not produce gets a placeholder id ("missing:<role>:<rid>") so that verify
    counts it as missing and any edge to it as not found; a (role, rid) that two stitched spans
    claim is a Weft error and raises."""
    ids: dict[tuple[str, str], str] = {}
    for span in spans:
        key = _span_key(span.kind, str(span.attributes.get("url.path", "")))
        if key is None:
            continue
        if key in ids and ids[key] != span.span_id:
            raise DemoError(f"two stitched spans for {key[0]} {key[1]}: {ids[key]} and {span.span_id}")
        ids[key] = span.span_id

    def span_of(role: str, rid: str) -> str:
        return ids.get((role, rid), f"missing:{role}:{rid}")

    truth = []
    for row in rows:
        role, rid = row["role"], row["rid"]
        if role == "server":
            parent = span_of("client", rid)
        else:
            parent = span_of("server", row["parent_rid"]) if row["parent_rid"] else ""
        truth.append({"span": span_of(role, rid), "parent": parent, "hop": row["hop"]})
    return truth


def write_truth(truth: Iterable[dict[str, str]], path: Path) -> Path:
    with open(path, "w") as fh:
        for row in truth:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path
