"""`weft simulate`: a synthetic multi-node workload with known true parents.

It models what the agents on N nodes would publish for a tree-shaped service mesh: fan-out
trees (sequential calls, parallel calls from spawned threads or `go` goroutines), keep-alive
client pools, ephemeral ports reused on the same tuple, NAT hops (client and server see
different tuples, same TCP seq), hops without a seq (tuple fallback), W3C traceparents (foreign
ones on entry requests, and ones Weft injected on a hop), thread ids reused after exit, per-node
clock offsets, and frames delivered twice. Everything follows from `--seed`.

Clock skew: each node's clock is off by a constant drawn from ±max_skew/2, so any two nodes
differ by at most `max_skew_ms` (default 400 ms, inside the engine's 500 ms bound).

Truth is written beside the events and never read by the engine: `truth.jsonl`, one line per
span: {"span": hex id, "parent": hex id or "", "hop": hop type, "node": node}.

Generation runs in two passes: first the request trees in true time, then per process the
resources that depend on time order (thread ids by interval colouring, connections from pools).
"""

from __future__ import annotations

import heapq
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from schemas import weft_events_pb2 as pb
from schemas.codec import CaptureWriter, encode_frame, make_frame
from stitcher.engine import events as ev
from stitcher.engine.ids import span_id

MS = 1_000_000
US = 1_000
T0 = 1_760_000_000 * 1_000_000_000   # simulated epoch
WATERMARK_EVERY_NS = 200 * MS
TAIL_NS = 12_000 * MS                # watermarks keep coming this long after the last request


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 4
    rps: float = 50.0
    seconds: float = 5.0
    seed: int = 1
    max_skew_ms: float = 400.0
    dup_rate: float = 0.02        # frames delivered twice
    nat_rate: float = 0.15        # services reached through a VIP (DNAT)
    noseq_rate: float = 0.05      # hops whose agent saw no TCP seq (tuple fallback)
    parallel_rate: float = 0.3    # handlers that fan out in parallel (spawned thread / goroutine)
    go_rate: float = 0.3          # services written in Go (goroutine lineage)
    foreign_tp_rate: float = 0.05  # entry requests carrying a foreign traceparent
    foreign_unsampled_rate: float = 0.0  # of those, the ones whose caller did not sample (flags 00)
    injected_rate: float = 0.05   # hops where Weft injected a traceparent
    loadgen_rate: float = 0.2     # roots that start at a traced client (no server parent)
    close_rate: float = 0.3       # keep-alive connections closed after a request (port reuse)
    max_depth: int = 4
    max_fanout: int = 3


@dataclass(eq=False)
class Service:
    node: int
    pid: int
    name: str
    go: bool
    ip: str
    port: int
    layer: int
    vip: str = ""                 # when set, clients dial vip:80 and are DNATed to ip:port


@dataclass(eq=False)
class Call:
    caller: Service
    start: int
    end: int
    target: Req
    mode: str                     # "inline" | "spawn"
    parent: Req | None            # None: a load generator's call (root client span)
    seq_ok: bool = True
    injected: str = ""
    # filled by pass 2
    tid: int = 0
    goid: int = 0
    port: int = 0
    cookie: int = 0
    seq: int = 0


@dataclass(eq=False)
class Req:
    svc: Service
    start: int
    end: int = 0
    calls: list[Call] = field(default_factory=list)
    caller: Call | None = None
    foreign_tp: str = ""
    # filled by pass 2
    tid: int = 0
    goid: int = 0
    cookie: int = 0


@dataclass
class _Conn:
    port: int
    client_cookie: int
    server_cookie: int
    seq: int
    busy_until: int = 0


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.node_names = [f"node-{i:03d}" for i in range(cfg.nodes)]
        self.skew = [int(self.rng.uniform(-cfg.max_skew_ms / 2, cfg.max_skew_ms / 2) * MS)
                     for _ in range(cfg.nodes)]
        self.services: list[Service] = []
        self.loadgens: list[Service] = []
        self.reqs: list[Req] = []
        self.calls: list[Call] = []
        self._cookie = 1000
        self._events: dict[int, list[tuple[int, int, pb.Event]]] = defaultdict(list)
        self._order = 0
        self.truth: list[dict[str, str]] = []
        self._build_topology()

    # ----------------------------------------------------------------------------- topology

    def _build_topology(self) -> None:
        cfg, rng = self.cfg, self.rng
        layers = cfg.max_depth
        for node in range(cfg.nodes):
            ip = f"10.{node // 250}.{node % 250}.1"
            for k in range(2):
                layer = (node * 2 + k) % layers
                go = rng.random() < cfg.go_rate
                svc = Service(node, 1000 + node * 10 + k, f"svc-{node:03d}-{k}-l{layer}", go, ip,
                              8000 + k, layer)
                if rng.random() < cfg.nat_rate:
                    svc.vip = f"10.{96 + node // 125}.{node % 125}.{k + 1}"
                self.services.append(svc)
            self.loadgens.append(Service(node, 1000 + node * 10 + 9, f"loadgen-{node:03d}", False, ip,
                                         0, -1))
        self.by_layer: dict[int, list[Service]] = defaultdict(list)
        for svc in self.services:
            self.by_layer[svc.layer].append(svc)

    # ------------------------------------------------------------------- pass 1: the trees

    def _net(self) -> int:
        return self.rng.randint(200 * US, 2 * MS)

    def _work(self) -> int:
        return self.rng.randint(300 * US, 6 * MS)

    def _serve(self, svc: Service, start: int, depth: int) -> Req:
        rng, cfg = self.rng, self.cfg
        req = Req(svc, start)
        self.reqs.append(req)
        t = start + self._work()
        n_calls = rng.randint(0, cfg.max_fanout) if depth < cfg.max_depth - 1 else 0
        parallel = n_calls > 1 and rng.random() < cfg.parallel_rate
        ends: list[int] = []
        for i in range(n_calls):
            nxt = self.by_layer.get(svc.layer + 1) or self.by_layer[0]
            callee = rng.choice(nxt)
            c_start = t + (i * 50 * US if parallel else 0)
            call = self._call(svc, callee, c_start, depth + 1, req, "spawn" if parallel else "inline")
            if parallel:
                ends.append(call.end)
            else:
                t = call.end + self._work()
        if ends:
            t = max(ends) + self._work()
        req.end = t + self._work()
        return req

    def _call(self, caller: Service, callee: Service, start: int, depth: int, parent: Req | None,
              mode: str) -> Call:
        rng, cfg = self.rng, self.cfg
        target = self._serve(callee, start + self._net(), depth)
        call = Call(caller, start, target.end + self._net(), target, mode, parent)
        call.seq_ok = callee.vip != "" or rng.random() >= cfg.noseq_rate
        if rng.random() < cfg.injected_rate:
            call.injected = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) | 1:016x}-01"
        target.caller = call
        self.calls.append(call)
        if parent is not None:
            parent.calls.append(call)
        return call

    def _roots(self) -> None:
        cfg, rng = self.cfg, self.rng
        count = int(cfg.rps * cfg.seconds)
        entry = self.by_layer[0]
        for _ in range(count):
            t = T0 + int(rng.uniform(0, cfg.seconds) * 1e9)
            if rng.random() < cfg.loadgen_rate:
                gen = rng.choice(self.loadgens)
                self._call(gen, rng.choice(entry), t, 0, None, "inline")
            else:
                req = self._serve(rng.choice(entry), t, 0)
                if rng.random() < cfg.foreign_tp_rate:
                    flags = "00" if cfg.foreign_unsampled_rate and rng.random() < cfg.foreign_unsampled_rate \
                        else "01"        # (no draw at the default: the same workload as before)
                    req.foreign_tp = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) | 1:016x}-{flags}"

    # ------------------------------------------------------- pass 2: threads and connections

    def _next_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    def _assign_threads(self) -> None:
        """Thread services: one thread per request (spawned by the main thread), one per parallel
        call (spawned by the request's thread); ids are reused as soon as a thread exited.
        Go services: one goroutine per request, one per parallel call."""
        by_pid: dict[int, list[tuple[int, int, int, object]]] = defaultdict(list)
        for req in self.reqs:
            by_pid[req.svc.pid].append((req.start - 50 * US, req.end + 50 * US, 0, req))
        for call in self.calls:
            if call.parent is None:
                call.tid = call.caller.pid + 1 + (call.start // MS) % 4   # load generator threads
            elif call.mode == "spawn":
                by_pid[call.caller.pid].append((call.start - 20 * US, call.end + 20 * US, 1, call))
        for pid, items in by_pid.items():
            items.sort(key=lambda it: (it[0], it[2]))
            svc = items[0][3].svc if isinstance(items[0][3], Req) else items[0][3].caller  # type: ignore[attr-defined]
            if svc.go:
                self._assign_goroutines(svc, items)
            else:
                self._assign_tids(svc, pid, items)
        for call in self.calls:
            if call.parent is not None and call.mode == "inline":
                call.tid, call.goid = call.parent.tid, call.parent.goid

    def _assign_goroutines(self, svc: Service, items: list[tuple[int, int, int, object]]) -> None:
        goid = 100
        for spawn_ts, _, _, obj in items:
            goid += self.rng.randint(1, 3)
            if isinstance(obj, Req):
                obj.goid, obj.tid = goid, svc.pid + self.rng.randint(1, 6)
            else:
                assert isinstance(obj, Call) and obj.parent is not None
                obj.goid, obj.tid = goid, svc.pid + self.rng.randint(1, 6)
                self._emit(svc.node, spawn_ts, ev.goroutine_spawn(svc.pid, obj.parent.goid, goid,
                                                                  self._local(svc.node, spawn_ts)))

    def _assign_tids(self, svc: Service, pid: int, items: list[tuple[int, int, int, object]]) -> None:
        free: list[int] = []
        busy: list[tuple[int, int]] = []   # (exit time, tid)
        next_tid = pid + 10
        for spawn_ts, exit_ts, _, obj in items:
            while busy and busy[0][0] < spawn_ts:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                tid = heapq.heappop(free)
            else:
                tid, next_tid = next_tid, next_tid + 1
            heapq.heappush(busy, (exit_ts, tid))
            if isinstance(obj, Req):
                obj.tid, parent_tid = tid, pid
            else:
                assert isinstance(obj, Call) and obj.parent is not None
                obj.tid, parent_tid = tid, obj.parent.tid
            node = svc.node
            self._emit(node, spawn_ts, ev.thread_spawn(pid, parent_tid, tid, self._local(node, spawn_ts)))
            self._emit(node, exit_ts, ev.task_exit(pid, tid, self._local(node, exit_ts)))

    def _assign_connections(self) -> None:
        rng, cfg = self.rng, self.cfg
        pools: dict[tuple[int, int], list[_Conn]] = defaultdict(list)
        free_ports: dict[tuple[int, int], list[int]] = defaultdict(list)
        next_port: dict[tuple[int, int], int] = defaultdict(lambda: 40000)
        fresh_port: dict[int, int] = defaultdict(lambda: 50000)
        for call in sorted(self.calls, key=lambda c: (c.start, c.caller.pid, c.target.svc.pid)):
            key = (call.caller.pid, call.target.svc.pid)
            if not call.seq_ok:
                # no seq: a connection of its own on a port not reused soon (tuple fallback)
                fresh_port[call.caller.pid] += 1
                call.port = 50000 + (fresh_port[call.caller.pid] - 50000) % 15000
                call.cookie, call.target.cookie = self._next_cookie(), self._next_cookie()
                continue
            pool = pools[key]
            conn = next((c for c in pool if c.busy_until < call.start), None)
            if conn is None:
                ports = free_ports[key]
                if ports:
                    port = heapq.heappop(ports)
                else:
                    port = next_port[key]
                    next_port[key] += 1
                conn = _Conn(port, self._next_cookie(), self._next_cookie(), rng.getrandbits(32))
                pool.append(conn)
            call.port, call.cookie, call.target.cookie, call.seq = (conn.port, conn.client_cookie,
                                                                    conn.server_cookie, conn.seq)
            conn.seq = (conn.seq + rng.randint(80, 400)) % (1 << 32)
            conn.busy_until = call.end
            if rng.random() < cfg.close_rate:
                pool.remove(conn)
                heapq.heappush(free_ports[key], conn.port)

    # ---------------------------------------------------------------------------- events

    def _local(self, node: int, t: int) -> int:
        return t + self.skew[node]

    def _emit(self, node: int, true_ts: int, event: pb.Event) -> None:
        self._order += 1
        self._events[node].append((self._local(node, true_ts), self._order, event))

    def _record(self) -> None:
        for req in self.reqs:
            self._record_server(req)
        for call in self.calls:
            self._record_client(call)

    def _sid(self, node: int, pid: int, cookie: int, role: int, local_start: int) -> str:
        return span_id(self.node_names[node], pid, cookie, role, local_start).hex()

    def _record_server(self, req: Req) -> None:
        svc, call = req.svc, req.caller
        node, start, end = svc.node, self._local(svc.node, req.start), self._local(svc.node, req.end)
        if call is None:
            client_ip, port, cookie = f"198.51.100.{req.start % 200 + 1}", 30000 + req.start % 20000, 0
            cookie = self._next_cookie()
            req.cookie = cookie
        else:
            client_ip, port = call.caller.ip, call.port
        traceparent = req.foreign_tp or (call.injected if call else "")
        seq = call.seq if call is not None and call.seq_ok else None
        if call is None:
            seq = self.rng.getrandbits(32)
        self._emit(node, req.end, ev.http(
            "server", pid=svc.pid, tid=req.tid, goid=req.goid, start=start, end=end, cookie=req.cookie,
            local=(svc.ip, svc.port), remote=(client_ip, port), seq=seq, path=f"/{svc.name}",
            host=f"{svc.name}:{svc.port}", traceparent=traceparent,
            status=500 if (req.start // US) % 97 == 0 else 200,
            version="1.0" if call is None and port % 11 == 0 else "1.1"))  # some outside clients: 1.0
        sid = self._sid(node, svc.pid, req.cookie, pb.ROLE_SERVER, start)
        if req.foreign_tp:
            parent, hop = req.foreign_tp.split("-")[2], "traceparent"
        elif call is None:
            parent, hop = "", "root"
        else:
            caller = call.caller
            parent = call.injected.split("-")[2] if call.injected else self._sid(  # Weft's ids win
                caller.node, caller.pid, call.cookie, pb.ROLE_CLIENT, self._local(caller.node, call.start))
            hop = ("traceparent" if call.injected else "nat" if svc.vip else
                   "cross_node" if call.seq_ok else "tuple")
        self.truth.append({"span": sid, "parent": parent, "hop": hop, "node": self.node_names[node]})

    def _record_client(self, call: Call) -> None:
        caller, target = call.caller, call.target.svc
        node = caller.node
        start, end = self._local(node, call.start), self._local(node, call.end)
        remote = (target.vip, 80) if target.vip else (target.ip, target.port)
        self._emit(node, call.end, ev.http(
            "client", pid=caller.pid, tid=call.tid, goid=call.goid, start=start, end=end,
            cookie=call.cookie, local=(caller.ip, call.port), remote=remote,
            seq=call.seq if call.seq_ok else None, path=f"/{target.name}",
            host=f"{target.name}:{remote[1]}", injected=call.injected, status=200, version="1.1"))
        # a request Weft injected into is exported with the span id it put on the wire
        sid = call.injected.split("-")[2] if call.injected else self._sid(
            node, caller.pid, call.cookie, pb.ROLE_CLIENT, start)
        if call.parent is None:
            parent, hop = "", "root"
        else:
            p = call.parent
            parent = self._sid(p.svc.node, p.svc.pid, p.cookie, pb.ROLE_SERVER, self._local(node, p.start))
            hop = "thread" if call.mode == "inline" else ("goroutine" if caller.go else "spawned_thread")
        self.truth.append({"span": sid, "parent": parent, "hop": hop, "node": self.node_names[node]})

    # ------------------------------------------------------------------------------ frames

    def run(self) -> None:
        self._roots()
        self._assign_threads()
        self._assign_connections()
        for svc in [*self.services, *self.loadgens]:
            self._emit(svc.node, T0 - 1_000 * MS, ev.process(svc.pid, svc.name,
                                                             "go-svc" if svc.go else "python3",
                                                             self._local(svc.node, T0 - 1_000 * MS),
                                                             runtime="go" if svc.go else ""))
        self._record()

    def frames(self, node: int) -> Iterator[pb.Frame]:
        """The node's frames in publish order: one per watermark tick, some delivered twice."""
        name = self.node_names[node]
        items = sorted(self._events[node])
        dup_rng = random.Random(self.cfg.seed * 7919 + node)
        end = T0 + int(self.cfg.seconds * 1e9) + TAIL_NS + self.skew[node]
        tick = T0 - 1_000 * MS + self.skew[node]
        i, seq = 0, 0
        held: pb.Frame | None = None
        while tick <= end or i < len(items):
            batch: list[pb.Event] = []
            while i < len(items) and items[i][0] <= tick:
                batch.append(items[i][2])
                i += 1
            batch.append(ev.watermark(tick))
            frame = make_frame(name, batch, agent_instance=node + 1, seq=seq)
            seq += 1
            yield frame
            if held is not None:
                yield held            # redelivered one frame late
                held = None
            if dup_rng.random() < self.cfg.dup_rate:
                held = frame
            tick += WATERMARK_EVERY_NS
        if held is not None:
            yield held

    def event_count(self) -> int:
        return sum(len(v) for v in self._events.values())


def write_captures(sim: Simulation, out_dir: Path) -> tuple[list[Path], int]:
    """One capture file per node plus truth.jsonl; returns (paths, frames written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    frames = 0
    for node, name in enumerate(sim.node_names):
        path = out_dir / f"{name}.wcap"
        with CaptureWriter(path, node=name, producer="weft-simulate") as writer:
            for frame in sim.frames(node):
                writer.write(frame)
                frames += 1
        paths.append(path)
    with open(out_dir / "truth.jsonl", "w") as fh:
        for row in sorted(sim.truth, key=lambda r: r["span"]):
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    return paths, frames


def interleaved_frames(sim: Simulation) -> Iterator[pb.Frame]:
    """All nodes' frames merged by time (a broker would see roughly this)."""
    streams = [sim.frames(n) for n in range(len(sim.node_names))]
    return heapq.merge(*streams, key=lambda frame: frame.t_max_ns)


def produce_kafka(sim: Simulation, bootstrap: str, out_truth: Path | None, topic: str | None = None) -> int:
    """Produce every node's frames (merged by time, keyed by node) with confluent-kafka."""
    from confluent_kafka import Producer

    from weft.config import KafkaSettings, load_section

    settings = load_section(KafkaSettings, "kafka", bootstrap=bootstrap, raw_topic=topic)
    producer = Producer({**settings.confluent(), "linger.ms": 20, "enable.idempotence": True})
    sent = 0
    for frame in interleaved_frames(sim):
        while True:
            try:
                producer.produce(settings.raw_topic, key=frame.node.encode(), value=encode_frame(frame))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        sent += 1
    if producer.flush(60):
        raise RuntimeError(f"{bootstrap}: frames still undelivered after 60 s")
    if out_truth is not None:
        out_truth.parent.mkdir(parents=True, exist_ok=True)
        out_truth.write_text("".join(json.dumps(r, sort_keys=True) + "\n"
                                     for r in sorted(sim.truth, key=lambda r: r["span"])))
    return sent


@click.command("simulate")
@click.option("--nodes", type=int, default=4, show_default=True)
@click.option("--rps", type=float, default=50.0, show_default=True, help="root requests per second")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="simulated seconds")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--kafka", "bootstrap", default=None, help="produce frames to this broker")
@click.option("--capture-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write one capture file per node (and truth.jsonl) here")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="with --kafka: where to write truth.jsonl")
@click.option("--topic", default=None, help="with --kafka: topic (default: kafka.raw_topic)")
def simulate_command(nodes: int, rps: float, seconds: float, seed: int, bootstrap: str | None,
                     capture_dir: Path | None, truth: Path | None, topic: str | None) -> None:
    """Generate a synthetic multi-node workload with known true parents."""
    if (bootstrap is None) == (capture_dir is None):
        raise click.UsageError("give exactly one of --kafka BOOTSTRAP or --capture-dir DIR")
    sim = Simulation(SimConfig(nodes=nodes, rps=rps, seconds=seconds, seed=seed))
    sim.run()
    if capture_dir is not None:
        paths, frames = write_captures(sim, capture_dir)
        click.echo(f"wrote {frames} frames, {sim.event_count()} events, {len(sim.truth)} spans "
                   f"to {len(paths)} capture files in {capture_dir} (truth: {capture_dir / 'truth.jsonl'})")
    else:
        assert bootstrap is not None
        sent = produce_kafka(sim, bootstrap, truth, topic)
        click.echo(f"produced {sent} frames, {sim.event_count()} events, {len(sim.truth)} spans")
