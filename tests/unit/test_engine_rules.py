"""Table-driven tests of the join engine's rules, one scenario per row.

Each scenario lists per-node events (times in ms after T0, node-local clocks) and the expected
parent of every span, by label "<S|C><path>@<node>" (S = server, C = client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from schemas import weft_events_pb2 as pb
from schemas.codec import make_frame
from schemas.resource import MAX_ATTRIBUTES, MAX_VALUE_LENGTH
from stitcher.engine import Engine, EngineConfig, Span
from stitcher.engine import events as E
from stitcher.engine.ids import root_trace_id, span_id
from stitcher.engine.records import ProcRecord, parse_proc_record, proc_record
from stitcher.engine.store import StateStore
from stitcher.state_memory import BatchedMemoryStateStore, MemoryStateStore
from weft.config import ConfigError

MS = 1_000_000
STORES = {"direct": MemoryStateStore, "batched": BatchedMemoryStateStore}
T0 = 1_760_000_000 * 1_000_000_000
A_IP, B_IP, VIP = "10.0.0.1", "10.0.0.2", "10.96.0.9"


def t(ms: float) -> int:
    return T0 + int(ms * MS)


_cookies = iter(range(1, 1 << 30))


def srv(path: str, start: float, end: float, *, tid: int = 11, pid: int = 100, goid: int = 0,
        seq: int | None = None, local: tuple[str, int] = (A_IP, 80),
        remote: tuple[str, int] = ("192.0.2.1", 5000), traceparent: str = "", status: int = 200) -> pb.Event:
    return E.http("server", pid=pid, tid=tid, goid=goid, start=t(start), end=t(end), cookie=next(_cookies),
                  local=local, remote=remote, seq=seq, path=path, traceparent=traceparent, status=status)


def cli(path: str, start: float, end: float, *, tid: int = 11, pid: int = 100, goid: int = 0,
        seq: int | None = None, local: tuple[str, int] = (A_IP, 40000),
        remote: tuple[str, int] = (B_IP, 80), injected: str = "", status: int = 200) -> pb.Event:
    return E.http("client", pid=pid, tid=tid, goid=goid, start=t(start), end=t(end), cookie=next(_cookies),
                  local=local, remote=remote, seq=seq, path=path, injected=injected, status=status)


def lost_srv(start: float, end: float, *, tid: int = 11, pid: int = 100, goid: int = 0,
             seq: int | None = None) -> pb.Event:
    """A server request whose record the kernel could not deliver (pb.LostRequest)."""
    return E.lost_http("server", pid=pid, tid=tid, goid=goid, start=t(start), end=t(end),
                       cookie=next(_cookies), local=(A_IP, 80), remote=("192.0.2.1", 5000), seq=seq)


def lost_cli(start: float, end: float, *, seq: int | None = None, local: tuple[str, int] = (A_IP, 40000),
             remote: tuple[str, int] = (B_IP, 80)) -> pb.Event:
    return E.lost_http("client", pid=100, tid=11, start=t(start), end=t(end), cookie=next(_cookies),
                       local=local, remote=remote, seq=seq)


def label(span: Span) -> str:
    pid = span.resource.pid
    suffix = "" if pid in (100, 200) else f"#{pid}"
    return f"{span.kind[0]}{span.attr('url.path')}@{span.resource.node}{suffix}"


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> StateStore:
    """Every test runs on the memory store directly and through the batched (Redis-like) path."""
    return STORES[request.param]()


def run(store: StateStore, nodes: dict[str, list[pb.Event]], config: EngineConfig | None = None,
        watermark_ms: float = 30_000, flush: bool = True) -> tuple[dict[str, Span], Engine]:
    """Feed each node's events (plus a final watermark) as one frame per node, then flush."""
    engine = Engine(store, config)
    engine.expect_nodes(nodes)
    spans: list[Span] = []
    for node, events in nodes.items():
        spans += engine.process(make_frame(node, [*events, E.watermark(t(watermark_ms))]))
    if flush:
        spans += engine.flush()
    by_label = {label(s): s for s in spans}
    assert len(by_label) == len(spans), "labels must be unique in a scenario"
    return by_label, engine


@dataclass
class Case:
    name: str
    nodes: dict[str, list[pb.Event]]
    parents: dict[str, str]          # label → parent label ("" = root / no parent)
    links: dict[str, str] = field(default_factory=dict)   # label → weft.link
    ambiguous: int = 0
    go_unlinked: int = 0
    parent_lost: int = 0
    blind: int = 0


def go_proc(ts_ms: float = -1000, pid: int = 100) -> pb.Event:
    return E.process(pid, "svc", "go-svc", t(ts_ms), runtime="go")


def py_proc(ts_ms: float = -1000, pid: int = 100) -> pb.Event:
    return E.process(pid, "svc", "python3", t(ts_ms))


CASES = [
    Case("sequential requests on one thread: the client joins the one it started in",
         {"A": [srv("/s1", 0, 30), srv("/s2", 40, 70), cli("/c", 50, 60)]},
         {"S/s1@A": "", "S/s2@A": "", "C/c@A": "S/s2@A"}, {"C/c@A": "thread"}),
    Case("several calls nested in one request all join it",
         {"A": [srv("/s", 0, 100), cli("/c1", 10, 20), cli("/c2", 30, 40), cli("/c3", 60, 95)]},
         {"S/s@A": "", "C/c1@A": "S/s@A", "C/c2@A": "S/s@A", "C/c3@A": "S/s@A"}),
    Case("overlapping requests on one thread (event loop): no link where both contain the call",
         {"A": [srv("/s1", 0, 100), srv("/s2", 20, 120), cli("/both", 50, 60), cli("/first", 10, 15)]},
         {"S/s1@A": "", "S/s2@A": "", "C/both@A": "", "C/first@A": "S/s1@A"},
         {"C/both@A": "orphan"}, ambiguous=1),
    # A request whose record the kernel lost still counts as a candidate (pb.LostRequest): a
    # lost record costs a link, never makes a wrong one.
    Case("event loop, one of two containing requests lost: ambiguous, not linked to the other",
         {"A": [srv("/s1", 0, 100), lost_srv(20, 120), cli("/both", 50, 60), cli("/first", 10, 15)]},
         {"S/s1@A": "", "C/both@A": "", "C/first@A": "S/s1@A"},
         {"C/both@A": "orphan"}, ambiguous=1),
    Case("goroutine lane: the lost request is the one containing the call: no link, flagged",
         {"A": [srv("/s1", 0, 30, goid=7), lost_srv(40, 100, goid=7), cli("/c", 50, 60, goid=7)]},
         {"S/s1@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, parent_lost=1),
    Case("a lost request on a spawning thread: the worker's call is not made a root",
         {"A": [lost_srv(0, 100), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12)]},
         {"C/c@A": ""}, {"C/c@A": "orphan"}, parent_lost=1),
    Case("a lost request elsewhere on the thread changes nothing",
         {"A": [lost_srv(0, 30), srv("/s2", 40, 70), cli("/c", 50, 60), lost_srv(80, 90)]},
         {"S/s2@A": "", "C/c@A": "S/s2@A"}, {"C/c@A": "thread"}),
    Case("cross-node: the seq matches a lost client only: no link, not the tuple fallback",
         {"A": [lost_cli(10, 50, seq=777), cli("/b", 5, 60, local=(A_IP, 40000), remote=(B_IP, 80))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": ""}, {"S/b@B": "orphan"}, parent_lost=1),
    Case("cross-node: the seq matches a captured client and a lost one: ambiguous",
         {"A": [lost_cli(10, 50, seq=777),
                cli("/b", 11, 49, seq=777, local=(A_IP, 40000), remote=(B_IP, 80))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": ""}, {"S/b@B": "orphan"}, ambiguous=1),
    # Records lost with no marker at all (pb.BlindSpan): no in-process link for a call a lost
    # request could have held; cross-node links (exact matches) stand.
    Case("a BlindSpan around a call: its in-process link is refused",
         {"A": [srv("/s", 0, 100), cli("/c", 40, 60), E.blind(t(30), t(50))]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, blind=1),
    Case("a BlindSpan ending before the call, or on another node, changes nothing",
         {"A": [srv("/s", 0, 100), cli("/c", 40, 60), E.blind(t(10), t(39))],
          "B": [E.blind(t(30), t(50))]},
         {"S/s@A": "", "C/c@A": "S/s@A"}, {"C/c@A": "thread"}),
    Case("a BlindSpan starting after the call was decided (early) does not undo it",
         {"A": [srv("/s", 0, 100), cli("/c", 40, 60), E.blind(t(5_000), t(5_100))]},
         {"S/s@A": "", "C/c@A": "S/s@A"}, {"C/c@A": "thread"}),
    Case("a BlindSpan starting after the early question is seen by the full one",
         {"A": [srv("/s1", 0, 100), srv("/s2", 20, 120), cli("/late", 110, 115),
                E.blind(t(5_000), t(5_100))]},
         {"S/s1@A": "", "S/s2@A": "", "C/late@A": ""}, {"C/late@A": "orphan"}, blind=1),
    Case("cross-node links stand in a BlindSpan",
         {"A": [cli("/b", 10, 50, seq=777, local=(A_IP, 40000), remote=(B_IP, 80)), E.blind(t(0), t(60))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000)),
                E.blind(t(0), t(60))]},
         {"C/b@A": "", "S/b@B": "C/b@A"}, {"S/b@B": "cross_node"}),
    Case("a handler's spawned worker thread calls out",
         {"A": [srv("/s", 0, 100), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12)]},
         {"S/s@A": "", "C/c@A": "S/s@A"}, {"C/c@A": "spawned_thread"}),
    Case("a worker spawned two levels down",
         {"A": [srv("/s", 0, 100), E.thread_spawn(100, 11, 12, t(10)), E.thread_spawn(100, 12, 13, t(15)),
                cli("/c", 20, 30, tid=13)]},
         {"S/s@A": "", "C/c@A": "S/s@A"}, {"C/c@A": "spawned_thread"}),
    Case("a thread spawned before the request (a pool) does not inherit it",
         {"A": [E.thread_spawn(100, 11, 12, t(5)), srv("/s", 10, 100), cli("/c", 20, 30, tid=12)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "root"}),
    Case("a reused tid follows its current creator, not the previous one",
         {"A": [srv("/a", 0, 40, tid=11), E.thread_spawn(100, 11, 13, t(5)), E.task_exit(100, 13, t(45)),
                srv("/b", 50, 200, tid=12), srv("/c", 55, 200, tid=11),
                E.thread_spawn(100, 12, 13, t(60)), cli("/x", 70, 80, tid=13)]},
         {"S/a@A": "", "S/b@A": "", "S/c@A": "", "C/x@A": "S/b@A"}, {"C/x@A": "spawned_thread"}),
    Case("a tid reused without a spawn record is a new thread: old requests do not count",
         {"A": [srv("/old", 0, 100, tid=12), E.task_exit(100, 12, t(101)), cli("/x", 120, 130, tid=12)]},
         {"S/old@A": "", "C/x@A": ""}),
    Case("goroutines: same goroutine, and a `go` child",
         {"A": [srv("/s", 0, 100, goid=100, tid=5), cli("/same", 10, 20, goid=100, tid=6),
                E.goroutine_spawn(100, 100, 101, t(25)), cli("/child", 30, 40, goid=101, tid=7)]},
         {"S/s@A": "", "C/same@A": "S/s@A", "C/child@A": "S/s@A"},
         {"C/same@A": "thread", "C/child@A": "goroutine"}),
    Case("cross-node by TCP seq and fingerprint, tuples agree",
         {"A": [cli("/b", 10, 50, seq=777, local=(A_IP, 40000), remote=(B_IP, 80))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": "C/b@A"}, {"S/b@B": "cross_node"}),
    Case("NAT: same seq and fingerprint, different tuples",
         {"A": [cli("/b", 10, 50, seq=777, local=(A_IP, 40000), remote=(VIP, 80))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 8080), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": "C/b@A"}, {"S/b@B": "nat"}),
    Case("same seq but another fingerprint does not link",
         {"A": [cli("/other", 10, 50, seq=777)],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/other@A": "", "S/b@B": ""}),
    Case("two seq matches, neither tuple confirms: ambiguous, no link",
         {"A": [cli("/b", 10, 50, seq=777, local=(A_IP, 40001), remote=(VIP, 80)),
                cli("/b", 11, 51, seq=777, pid=101, local=(A_IP, 40002), remote=(VIP, 80))],
          "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"S/b@B": "", "C/b@A": "", "C/b@A#101": ""}, {"S/b@B": "orphan"}, ambiguous=1),
    Case("no seq: same tuple, containment within the skew bound (B's clock 300 ms ahead)",
         {"A": [cli("/b", 10, 50, local=(A_IP, 40000), remote=(B_IP, 80))],
          "B": [srv("/b", 312, 348, pid=200, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": "C/b@A"}, {"S/b@B": "tuple"}),
    Case("no seq: skew beyond the bound does not link",
         {"A": [cli("/b", 10, 50, local=(A_IP, 40000), remote=(B_IP, 80))],
          "B": [srv("/b", 712, 748, pid=200, local=(B_IP, 80), remote=(A_IP, 40000))]},
         {"C/b@A": "", "S/b@B": ""}, {"S/b@B": "root"}),
    # Go multiplexes goroutines over OS threads: thread / clone lineage must never link there.
    Case("Go process, same-thread candidate, no goid: no link (orphan, counted)",
         {"A": [go_proc(), srv("/s", 0, 100), cli("/c", 10, 50)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, go_unlinked=1),
    Case("Go process, spawned-thread candidate, no goid: no link",
         {"A": [go_proc(), srv("/s", 0, 100), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, go_unlinked=1),
    Case("Go process, thread candidate, client has a goid but the server has none: no link",
         {"A": [go_proc(), srv("/s", 0, 100), cli("/c", 10, 50, goid=7)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "root"}),
    Case("Go process, ProcessInfo after the requests in the stream (before the decision): no link",
         {"A": [srv("/s", 0, 100), cli("/c", 10, 50), go_proc(ts_ms=60)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, go_unlinked=1),
    Case("Go process with goids on both sides: goroutine lineage still links",
         {"A": [go_proc(), srv("/s", 0, 100, goid=100, tid=5), cli("/same", 10, 20, goid=100, tid=6),
                E.goroutine_spawn(100, 100, 101, t(25)), cli("/child", 30, 40, goid=101, tid=5)]},
         {"S/s@A": "", "C/same@A": "S/s@A", "C/child@A": "S/s@A"},
         {"C/same@A": "thread", "C/child@A": "goroutine"}),
    Case("a non-Go process with the same events links by thread",
         {"A": [py_proc(), srv("/s", 0, 100), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12),
                cli("/d", 40, 50)]},
         {"S/s@A": "", "C/c@A": "S/s@A", "C/d@A": "S/s@A"}, {"C/c@A": "spawned_thread", "C/d@A": "thread"}),
    Case("Go is sticky: a later record without the runtime (a partial read) does not hide it",
         {"A": [go_proc(), py_proc(ts_ms=5), srv("/s", 0, 100), cli("/c", 10, 50)]},
         {"S/s@A": "", "C/c@A": ""}, {"C/c@A": "orphan"}, go_unlinked=1),
    Case("Go is per process: a Go caller's neighbour (another pid) still links by thread",
         {"A": [go_proc(), py_proc(pid=101), srv("/s", 0, 100), cli("/c", 10, 50),
                srv("/s2", 0, 100, pid=101), cli("/c2", 10, 50, pid=101)]},
         {"S/s@A": "", "C/c@A": "", "S/s2@A#101": "", "C/c2@A#101": "S/s2@A#101"},
         {"C/c@A": "orphan", "C/c2@A#101": "thread"}, go_unlinked=1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case: Case, store: StateStore) -> None:
    spans, engine = run(store, case.nodes)
    by_id = {s.span_id: label for label, s in spans.items()}
    got = {lab: by_id.get(s.parent_span_id, "") for lab, s in spans.items() if lab in case.parents}
    assert got == case.parents
    for lab, link in case.links.items():
        assert spans[lab].link == link, lab
    assert engine.stats.ambiguous == case.ambiguous
    assert engine.stats.go_unlinked == case.go_unlinked
    assert engine.stats.parent_lost == case.parent_lost
    assert engine.stats.blind == case.blind
    assert sum(s.attr("weft.records_lost") is True for s in spans.values()) == case.blind
    assert sum(s.attr("weft.parent_lost") is True for s in spans.values()) == case.parent_lost
    # a trace is one tree: every child shares its parent's trace
    for s in spans.values():
        parent = next((p for p in spans.values() if p.span_id == s.parent_span_id), None)
        if parent is not None:
            assert s.trace_id == parent.trace_id


FOREIGN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_incoming_traceparent_wins_over_seq(store: StateStore) -> None:
    spans, _ = run(store, {"A": [cli("/b", 10, 50, seq=777)],
                    "B": [srv("/b", 12, 48, pid=200, seq=777, local=(B_IP, 80), remote=(A_IP, 40000),
                              traceparent=FOREIGN)]})
    server = spans["S/b@B"]
    assert server.parent_span_id.hex() == "b7ad6b7169203331"
    assert server.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert server.link == "traceparent"


def test_traceparent_weft_injected_links_to_its_client(store: StateStore) -> None:
    injected = "00-11111111111111111111111111111111-2222222222222222-01"
    spans, _ = run(store, {"A": [srv("/a", 0, 100), cli("/b", 10, 50, injected=injected)],
                    "B": [srv("/b", 12, 48, pid=200, local=(B_IP, 80), remote=(A_IP, 40000),
                              traceparent=injected)]})
    assert spans["S/b@B"].parent_span_id == spans["C/b@A"].span_id
    assert spans["S/b@B"].trace_id == spans["S/a@A"].trace_id == root_trace_id(spans["S/a@A"].span_id)


@pytest.mark.parametrize(("flags", "remote"), [("01", True), ("00", False), ("03", True), ("0a", False),
                                             ("zz", None), ("", None)])
def test_a_callers_sampled_flag_reaches_every_span_of_its_trace(store: StateStore, flags: str,
                                                                remote: bool | None) -> None:
    """The incoming traceparent's flag (Span.remote_sampled, what a parent-based sampler reads)
    goes down the trace by every link type: thread, Weft's own injected header, seq; a trace split
    off for depth starts in Weft and has none. Without a traceparent, none at all."""
    caller = f"{FOREIGN[:-3]}-{flags}" if flags else ""
    weft = f"00-{FOREIGN.split('-')[1]}-3333333333333333-{flags or '01'}"
    spans, _ = run(store, {
        "A": [srv("/a", 0, 100, traceparent=caller), cli("/b", 10, 50, injected=weft),
              srv("/x", 200, 300, tid=12)],
        "B": [srv("/b", 12, 48, pid=200, local=(B_IP, 80), remote=(A_IP, 40000), traceparent=weft),
              cli("/c", 20, 40, pid=200, seq=91, local=(B_IP, 40001), remote=(VIP, 80))],
        "C": [srv("/c", 22, 38, pid=300, seq=91, local=("10.0.0.3", 80), remote=(B_IP, 40001))]},
        EngineConfig(max_trace_depth=4 if caller else 3))   # an outside caller's trace starts at 1
    chain = [spans[k] for k in ("S/a@A", "C/b@A", "S/b@B", "C/c@B")]
    for child, parent in zip(chain[1:], chain, strict=False):
        assert child.parent_span_id == parent.span_id
    assert spans["S/c@C#300"].attr("weft.split_from") == spans["C/c@B"].span_id.hex()
    if not caller:
        remote = None
    assert [s.remote_sampled for s in chain] == [remote] * 4
    assert spans["S/c@C#300"].remote_sampled is None and spans["S/x@A"].remote_sampled is None


@pytest.mark.parametrize("ignore", ["", "/healthz, /ready/*"])
def test_a_trace_that_begins_at_an_ignored_route_is_left_out_whole(store: StateStore, ignore: str) -> None:
    """A health check's trace — its server span, the calls its handler makes, their servers on
    other nodes, a span split off for depth — is not exported; the same route called inside
    another trace is; a caller's traceparent does not change it; the join links all the same."""
    nodes = {
        "A": [srv("/healthz", 0, 100), cli("/db", 10, 50, seq=31),
              srv("/a", 200, 300, tid=12), cli("/healthz", 210, 250, tid=12, seq=32, local=(A_IP, 40002)),
              srv("/ready/db", 400, 500, tid=13, traceparent=FOREIGN),
              srv("/healthz/deep", 600, 700, tid=14)],
        "B": [srv("/db", 12, 48, pid=200, seq=31, local=(B_IP, 80), remote=(A_IP, 40000)),
              cli("/disk", 20, 40, pid=200, seq=33, local=(B_IP, 40001), remote=(VIP, 80)),
              srv("/healthz", 212, 248, pid=200, tid=12, seq=32, local=(B_IP, 80), remote=(A_IP, 40002))],
        "C": [srv("/disk", 22, 38, pid=300, seq=33, local=("10.0.0.3", 80), remote=(B_IP, 40001))]}
    spans, engine = run(store, nodes, EngineConfig(max_trace_depth=3, ignore_routes=ignore))
    left_out = {"S/healthz@A", "C/db@A", "S/db@B", "C/disk@B", "S/disk@C#300", "S/ready/db@A"}
    kept = {"S/a@A", "C/healthz@A", "S/healthz@B", "S/healthz/deep@A"}
    if not ignore:
        assert set(spans) == left_out | kept and engine.stats.ignored == 0
        return
    assert set(spans) == kept
    assert engine.stats.ignored == len(left_out)
    assert spans["S/healthz@B"].parent_span_id == spans["C/healthz@A"].span_id
    assert engine.stats.trace_splits == 1       # S/disk@C#300, split off and still left out


def test_ignore_routes_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"^engine.ignore_routes: 'healthz' must start with /$"):
        Engine(MemoryStateStore(), EngineConfig(ignore_routes=["/ok", "healthz"]))
    described = EngineConfig(ignore_routes="/a, /b/*").describe_ignored()
    assert described == "traces that begin at /a, /b/* are not exported"
    assert EngineConfig().describe_ignored() == ""


def test_ids_are_functions_of_the_events(store: StateStore) -> None:
    event = cli("/c", 10, 20)
    spans, _ = run(store, {"A": [event]})
    h = event.http
    assert spans["C/c@A"].span_id == span_id("A", h.pid, h.sock_cookie, h.role, h.start_ns)
    assert spans["C/c@A"].trace_id == root_trace_id(spans["C/c@A"].span_id)


def test_span_status_follows_the_http_conventions(store: StateStore) -> None:
    """Error: 5xx on either side, 4xx on the client side only (a server answering 4xx did its
    job), and a request that got no response at all (the agent ends it at the connection's close,
    flagged): that one carries error.type and still joins across nodes by its seq."""
    spans, engine = run(store, {
        "A": [srv("/a", 0, 300), cli("/gone", 10, 250, seq=41, status=0), cli("/nf", 260, 270, status=404)],
        "B": [srv("/gone", 12, 240, pid=200, seq=41, local=(B_IP, 80), remote=(A_IP, 40000), status=0),
              srv("/nf", 262, 268, pid=200, local=(B_IP, 81), status=404)]})
    assert engine.stats.invalid == 0
    gone_c, gone_s = spans["C/gone@A"], spans["S/gone@B"]
    assert gone_s.parent_span_id == gone_c.span_id and gone_c.parent_span_id == spans["S/a@A"].span_id
    for s in (gone_c, gone_s):
        assert s.error and s.attr("error.type") == "no_response"
        assert s.attr("http.response.status_code") is None
    assert spans["C/nf@A"].error and not spans["S/nf@B"].error
    assert spans["S/nf@B"].attr("error.type") is None and not spans["S/a@A"].error


def test_span_attributes_and_resource_follow_semconv(store: StateStore) -> None:
    """The HTTP conventions' attributes, required ones included (url.scheme on a server span,
    url.full on a client span, error.type with the status code of a failed call), and
    network.protocol.version when the agent read it from the request line."""
    def call(path: str, remote: tuple[str, int], host: str, status: int, version: str = "") -> pb.Event:
        return E.http("client", pid=100, tid=11, start=t(2), end=t(8), cookie=next(_cookies),
                      local=(A_IP, 40001), remote=remote, path=path, host=host, status=status,
                      version=version)

    spans, _ = run(store, {"A": [E.process(100, "checkout", "python3", t(-1000)),
                                 srv("/pay", 0, 10, status=503, remote=("192.0.2.7", 5555)),
                                 call("/quote", ("2001:db8::9", 8080), "", 404, "1.0"),
                                 call("/stock", (B_IP, 80), "stock.shop", 200, "1.1"),
                                 call("/v6", ("2001:db8::9", 80), "[2001:db8::9]:80", 200)]})
    s = spans["S/pay@A"]
    assert (s.kind, s.name, s.error) == ("SERVER", "GET /pay", True)
    assert dict(s.attributes) == {
        "http.request.method": "GET", "url.path": "/pay", "http.response.status_code": 503,
        "url.scheme": "http", "server.address": A_IP, "server.port": 80,
        "client.address": "192.0.2.7", "client.port": 5555, "network.peer.address": "192.0.2.7",
        "network.peer.port": 5555, "weft.link": "root", "error.type": "503"}
    quote, stock, v6 = (dict(spans[f"C/{p}@A"].attributes) for p in ("quote", "stock", "v6"))
    assert quote == {
        "http.request.method": "GET", "url.path": "/quote", "http.response.status_code": 404,
        "url.full": "http://[2001:db8::9]:8080/quote", "server.address": "2001:db8::9",
        "server.port": 8080, "network.peer.address": "2001:db8::9", "network.peer.port": 8080,
        "weft.link": "thread", "network.protocol.version": "1.0", "error.type": "404"}
    assert (stock["url.full"], stock["server.address"], "error.type" in stock) == (
        "http://stock.shop/stock", "stock.shop", False)
    assert stock["network.protocol.version"] == "1.1"
    assert (v6["url.full"], v6["server.address"]) == ("http://[2001:db8::9]:80/v6", "2001:db8::9")
    assert "network.protocol.version" not in v6    # an agent older than the version flags
    assert s.resource.attributes() == (("service.name", "checkout"), ("host.name", "A"),
                                       ("process.pid", 100), ("process.executable.name", "python3"))


def test_a_proxy_s_request_targets_name_the_server_asked_for(store: StateStore) -> None:
    """A forward proxy's clients send the absolute URL ("GET http://shop:8080/cart HTTP/1.1") or,
    for a tunnel, CONNECT host:port (RFC 9112 3.2). url.path is the URL's path (none for CONNECT),
    url.full the URL as sent, url.scheme its scheme, server.address/port the server asked for
    (its scheme's port when the URL names none), network.peer.* the proxy; a span is named by the
    path. The hop to the proxy still joins by the target as sent."""
    proxy = (B_IP, 3128)

    def hop(role: str, target: str, host: str, *, method: str = "GET", tid: int = 11,
            start: float = 2, end: float = 8, seq: int = 0) -> pb.Event:
        client = role == "client"
        return E.http(role, pid=100 if client else 200, tid=tid, start=t(start), end=t(end),
                      cookie=next(_cookies), local=(A_IP, 40000 + seq) if client else proxy,
                      remote=proxy if client else (A_IP, 40000 + seq), seq=seq, method=method,
                      path=target, host=host)

    url = "http://shop.example:8080/cart/1"
    spans, _ = run(store, {
        "A": [srv("/checkout", 0, 100),
              hop("client", url, "shop.example:8080", seq=1),
              hop("client", "HTTP://Shop.Example", "", seq=2, start=10, end=20),
              hop("client", "shop.example:443", "shop.example:443", method="CONNECT", seq=3,
                  start=30, end=40)],
        "B": [hop("server", url, "shop.example:8080", seq=1, start=3, end=7)]})
    cart, cart_at_proxy, home = spans["C/cart/1@A"], spans["S/cart/1@B"], spans["C/@A"]
    assert cart.name == cart_at_proxy.name == "GET /cart/1"
    assert (cart.attr("url.full"), cart.attr("server.address"), cart.attr("server.port"),
            cart.attr("network.peer.port")) == (url, "shop.example", 8080, 3128)
    assert (cart_at_proxy.attr("url.scheme"), cart_at_proxy.attr("server.address"),
            cart_at_proxy.attr("server.port"), cart_at_proxy.attr("client.port")) == (
        "http", "shop.example", 8080, 40001)
    assert cart_at_proxy.parent_span_id == cart.span_id and cart_at_proxy.link == "cross_node"
    assert (home.name, home.attr("url.full"), home.attr("server.address"), home.attr("server.port")) == (
        "GET /", "HTTP://Shop.Example", "Shop.Example", 80)
    tunnel = spans["CNone@A"]
    assert (tunnel.name, tunnel.attr("url.full"), tunnel.attr("server.address"),
            tunnel.attr("server.port")) == ("CONNECT", None, "shop.example", 443)


def test_a_method_outside_the_known_set_is_exported_as_other(store: StateStore) -> None:
    """The conventions' _OTHER: a method token anyone can invent (WebDAV's, a scanner's) names
    no span; the token is kept in http.request.method_original, and the hop still joins by it."""
    def dav(role: str, **kw: Any) -> pb.Event:
        return E.http(role, method="PROPFIND", path="/dav", seq=77, cookie=next(_cookies), **kw)

    spans, _ = run(store, {
        "A": [srv("/a", 0, 100), dav("client", pid=100, tid=11, start=t(10), end=t(50),
                                     local=(A_IP, 40000), remote=(B_IP, 80))],
        "B": [dav("server", pid=200, tid=11, start=t(12), end=t(48), local=(B_IP, 80), remote=(A_IP, 40000)),
              E.http("server", pid=200, tid=12, start=t(60), end=t(70), cookie=next(_cookies),
                     local=(B_IP, 80), remote=(A_IP, 40001), method="PATCH", path="/p")]})
    client, server = spans["C/dav@A"], spans["S/dav@B"]
    for s in (client, server):
        assert s.name == "HTTP /dav"
        assert s.attr("http.request.method") == "_OTHER"
        assert s.attr("http.request.method_original") == "PROPFIND"
    assert server.parent_span_id == client.span_id and server.link == "cross_node"
    patch = spans["S/p@B"]
    assert (patch.name, patch.attr("http.request.method"), patch.attr("http.request.method_original")) == (
        "PATCH /p", "PATCH", None)


def test_the_process_own_resource_attributes_follow_weft_own(store: StateStore) -> None:
    """What the process brings (its OTEL_RESOURCE_ATTRIBUTES, its container) comes after Weft's
    keys, sorted; a key Weft sets itself or a separator in a value cannot bend the record; a Go
    runtime is still told apart with the attributes after it; an exec changes them."""
    own = {"service.namespace": "shop", "k8s.pod.uid": "0f6c3a52-1b2d-4e5f-8a9b-0c1d2e3f4a5b",
           "host.name": "spoofed", "odd": "a\x1fb\x1ec=d"}
    spans, _ = run(store, {"A": [E.process(100, "checkout", "python3", t(-1000), attrs=own),
                                 srv("/pay", 0, 10),
                                 E.process(100, "refunds", "refunds", t(20), runtime="go",
                                           attrs={"deployment.environment.name": "prod"}),
                                 srv("/refund", 30, 40, tid=100), cli("/call", 32, 35, tid=100)]})
    assert spans["S/pay@A"].resource.attributes() == (
        ("service.name", "checkout"), ("host.name", "A"), ("process.pid", 100),
        ("process.executable.name", "python3"),
        ("k8s.pod.uid", "0f6c3a52-1b2d-4e5f-8a9b-0c1d2e3f4a5b"), ("odd", "a?b?c=d"),
        ("service.namespace", "shop"))
    assert spans["S/refund@A"].resource.attributes()[3:] == (
        ("process.executable.name", "refunds"), ("deployment.environment.name", "prod"))
    assert spans["C/call@A"].parent_span_id == b""   # Go: never linked by its OS thread


def test_a_process_record_reads_back_whatever_its_age() -> None:
    old = "checkout\x1fpython3"
    assert parse_proc_record(old) == ProcRecord("checkout", "python3", "", ())
    assert parse_proc_record(old + "\x1fgo") == ProcRecord("checkout", "python3", "go", ())
    info = pb.ProcessInfo(exe="gopls", service_name="ide", resource_attributes={"a": "1", "b=c": "2"})
    assert parse_proc_record(proc_record(info)) == ProcRecord("ide", "gopls", "", (("a", "1"), ("b?c", "2")))
    assert proc_record(pb.ProcessInfo(exe="x", service_name="y")) == "y\x1fx"   # as before attributes
    # stitchers from before attributes (a rolling upgrade) look for a last field "go"
    go = proc_record(pb.ProcessInfo(exe="srv", runtime="go", resource_attributes={"a": "1"}))
    assert go.endswith("\x1fgo") and parse_proc_record(go) == ProcRecord("srv", "srv", "go", (("a", "1"),))
    many = {f"k{i:03d}": "v" * 1000 for i in range(100)}
    got = parse_proc_record(proc_record(pb.ProcessInfo(exe="x", resource_attributes=many))).attrs
    assert [k for k, _ in got] == [f"k{i:03d}" for i in range(MAX_ATTRIBUTES)]
    assert {len(v) for _, v in got} == {MAX_VALUE_LENGTH}


def test_spans_wait_for_the_watermark_then_export_once(store: StateStore) -> None:
    engine = Engine(store)
    engine.expect_nodes(["A"])
    first = engine.process(make_frame("A", [srv("/s", 0, 10), E.watermark(t(100))]))
    assert first == []                      # S.end + link_wait (500 ms) not passed yet
    second = engine.process(make_frame("A", [E.watermark(t(600))]))
    assert [label(s) for s in second] == ["S/s@A"]
    assert engine.process(make_frame("A", [E.watermark(t(5000))])) == []
    assert engine.flush() == []
    assert engine.stats.emitted == 1


@pytest.mark.parametrize("early_roots", [False, True])
def test_client_waits_for_its_server_that_ends_later(store: StateStore, early_roots: bool) -> None:
    # The handler runs on 880 ms after its call returned, on a thread that served nothing
    # before: found at the full threshold; with early_roots the call is taken for a
    # client-only thread's at C.end + 0.5 s (the documented recall price of early roots).
    engine = Engine(store, EngineConfig(max_request_s=1.0, early_roots=early_roots))
    engine.expect_nodes(["A"])
    out = engine.process(make_frame("A", [cli("/c", 10, 20), E.watermark(t(50))]))
    out += engine.process(make_frame("A", [srv("/s", 0, 900), E.watermark(t(2000))]))
    spans = {label(s): s for s in out}
    if early_roots:
        assert spans["C/c@A"].parent_span_id == b"" and spans["C/c@A"].link == "root"
    else:
        assert spans["C/c@A"].parent_span_id == spans["S/s@A"].span_id


def test_a_served_thread_waits_for_its_long_handler(store: StateStore) -> None:
    # the same, on a thread known to serve requests: the early question is deferred
    spans, _ = run(store, {"A": [srv("/before", 0, 5), cli("/c", 10, 20), srv("/s", 8, 900)]},
                   EngineConfig(max_request_s=1.0))
    assert spans["C/c@A"].parent_span_id == spans["S/s@A"].span_id


def test_stopped_node_times_out_and_its_late_events_are_marked(store: StateStore) -> None:
    engine = Engine(store, EngineConfig(node_timeout_s=2.0))
    engine.expect_nodes(["A", "B"])
    engine.process(make_frame("B", [E.watermark(t(10))]))      # B then goes silent
    out = engine.process(make_frame("A", [srv("/s", 0, 10), E.watermark(t(1000))]))
    assert out == []                                          # still waiting for B
    out = engine.process(make_frame("A", [E.watermark(t(3000))]))
    assert [label(s) for s in out] == ["S/s@A"]               # B timed out
    assert engine.stats.nodes_timed_out == 1
    late = engine.process(make_frame("B", [cli("/s", 5, 9, seq=1), E.watermark(t(20))]))
    assert [label(s) for s in late] == ["C/s@B"]
    assert late[0].attr("weft.late") is True and late[0].parent_span_id == b""
    assert engine.stats.late == 1


def test_unread_node_is_not_timed_out_while_the_consumer_catches_up(store: StateStore) -> None:
    # the same stream, but the consumer says it still has unread messages (B's partition lags):
    # B is waited for, and its events, once read, are linked, not late
    engine = Engine(store, EngineConfig(node_timeout_s=2.0))
    engine.expect_nodes(["A", "B"])
    engine.hold_node_timeouts = True
    engine.process(make_frame("B", [E.watermark(t(10))]))
    out = engine.process(make_frame("A", [srv("/s", 0, 10, seq=1), E.watermark(t(1000))]))
    out += engine.process(make_frame("A", [E.watermark(t(3000))]))
    assert out == [] and engine.stats.nodes_timed_out == 0
    out = engine.process(make_frame("B", [cli("/s", 0, 10, seq=1), E.watermark(t(3000))]))
    spans = {label(s): s for s in out}
    assert spans["S/s@A"].parent_span_id == spans["C/s@B"].span_id
    assert engine.stats.late == 0


@pytest.mark.parametrize(("config", "split_label"), [
    (EngineConfig(max_trace_depth=1), "S/b@B"),
    (EngineConfig(max_trace_duration_s=0.005), "C/b@A"),
])
def test_trace_bounds_start_a_new_trace(config: EngineConfig, split_label: str, store: StateStore) -> None:
    spans, engine = run(store, {"A": [srv("/a", 0, 100), cli("/b", 10, 50, seq=9)],
                         "B": [srv("/b", 12, 48, pid=200, seq=9, local=(B_IP, 80), remote=(A_IP, 40000))]},
                        config)
    split = spans[split_label]
    assert split.parent_span_id == b"" and split.trace_id == root_trace_id(split.span_id)
    assert split.attr("weft.split_from") != ""
    assert engine.stats.trace_splits == 1
    assert len({s.trace_id for s in spans.values()}) == 2


def test_duplicated_frames_change_nothing(store: StateStore) -> None:
    nodes = {"A": [srv("/a", 0, 100), cli("/b", 10, 50, seq=9)],
             "B": [srv("/b", 12, 48, pid=200, seq=9, local=(B_IP, 80), remote=(A_IP, 40000))]}
    once, _ = run(type(store)(), nodes)
    engine = Engine(store)
    engine.expect_nodes(nodes)
    spans: list[Span] = []
    for node, events in nodes.items():
        frame = make_frame(node, [*events, E.watermark(t(30_000))])
        spans += engine.process(frame) + engine.process(frame)
    spans += engine.flush()
    assert sorted(spans, key=Span.sort_key) == sorted(once.values(), key=Span.sort_key)
    assert engine.stats.duplicates == 3 and engine.stats.late == 0


def test_invalid_requests_are_counted_not_stitched(store: StateStore) -> None:
    bad = E.http("server", pid=1, tid=1, start=t(10), end=t(5), cookie=1, local=(A_IP, 80), remote=(B_IP, 1))
    spans, engine = run(store, {"A": [bad]})
    assert spans == {} and engine.stats.invalid == 1


def test_in_process_link_is_exported_without_waiting_max_request(store: StateStore) -> None:
    engine = Engine(store)
    engine.expect_nodes(["A"])
    out = engine.process(make_frame("A", [srv("/s", 0, 100), cli("/c", 10, 50), E.watermark(t(700))]))
    spans = {label(s): s for s in out}
    assert set(spans) == {"S/s@A", "C/c@A"}           # at C.end + 0.5 s, not x + 10 s
    assert spans["C/c@A"].parent_span_id == spans["S/s@A"].span_id


def test_event_loop_evidence_defers_the_early_answer_to_the_full_one(store: StateStore) -> None:
    # S1 contains the call; S3 overlaps S1 on the same thread (an event loop), so the early
    # answer is not trusted; by the full threshold the long S2 also contains the call.
    spans, engine = run(store, {"A": [srv("/s1", 0, 100), srv("/s3", 55, 90), cli("/c", 50, 60),
                               srv("/s2", 20, 2000)]})
    assert spans["C/c@A"].parent_span_id == b"" and spans["C/c@A"].link == "orphan"
    assert engine.stats.ambiguous == 1


def test_a_parent_cycle_from_malformed_input_is_cut_not_lost(store: StateStore) -> None:
    x = "00-11111111111111111111111111111111-aaaaaaaaaaaaaaaa-01"
    y = "00-22222222222222222222222222222222-bbbbbbbbbbbbbbbb-01"
    spans, engine = run(store, {
        "A": [srv("/sa", 0, 100, traceparent=y), cli("/ca", 10, 50, injected=x)],
        "B": [srv("/sb", 0, 100, pid=200, tid=21, traceparent=x),
              cli("/cb", 10, 50, pid=200, tid=21, injected=y)]})
    assert set(spans) == {"S/sa@A", "C/ca@A", "S/sb@B", "C/cb@B"}
    assert all(s.parent_span_id == b"" and s.attr("weft.unresolved") is True for s in spans.values())
    assert engine.stats.unresolved == 4


def test_go_client_without_goid_is_an_orphan_exported_early_and_flagged(store: StateStore) -> None:
    engine = Engine(store)
    engine.expect_nodes(["A"])
    out = engine.process(make_frame("A", [go_proc(), srv("/s", 0, 100), cli("/c", 10, 50),
                                          E.watermark(t(700))]))
    spans = {label(s): s for s in out}
    assert set(spans) == {"S/s@A", "C/c@A"}           # at C.end + 0.5 s, not x + 10 s
    c = spans["C/c@A"]
    assert (c.parent_span_id, c.link, c.attr("weft.no_goroutine")) == (b"", "orphan", True)
    assert c.resource.exe == "go-svc" and engine.stats.go_unlinked == 1


def test_a_finished_worker_thread_links_early_despite_its_reused_tid(store: StateStore) -> None:
    # The fan-out worker (tid 12) exits at 31 ms; its tid then serves /r. At C.end + 0.5 s the
    # worker's incarnation is over, so /r cannot be its parent and nothing else can arrive:
    # the call joins /s through clone lineage now, not at x + max_request_s.
    engine = Engine(store)
    engine.expect_nodes(["A"])
    out = engine.process(make_frame("A", [
        srv("/s", 0, 300), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12),
        E.task_exit(100, 12, t(31)), E.thread_spawn(100, 100, 12, t(40)), srv("/r", 41, 60, tid=12),
        E.task_exit(100, 12, t(61)), E.watermark(t(900))]))
    spans = {label(s): s for s in out}
    assert spans["C/c@A"].parent_span_id == spans["S/s@A"].span_id
    assert spans["C/c@A"].link == "spawned_thread"


def test_a_worker_still_alive_at_the_early_point_waits(store: StateStore) -> None:
    # the same, but the worker's incarnation is not over by C.end + 0.5 s: deferred
    engine = Engine(store)
    engine.expect_nodes(["A"])
    frame = [srv("/s", 0, 300), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12),
             srv("/late", 25, 35, tid=12), E.watermark(t(900))]
    assert "C/c@A" not in {label(s) for s in engine.process(make_frame("A", frame))}
    out = engine.process(make_frame("A", [E.task_exit(100, 12, t(2000)), E.watermark(t(10_100))]))
    assert {label(s) for s in out} == {"C/c@A"}


def test_an_ended_thread_that_served_before_still_waits(store: StateStore) -> None:
    # The worker served /early itself, then made the call and exited. Its incarnation ended by
    # C.end + 0.5 s, but a request it read could still be answered by another thread, so the
    # lane is not passed over early: the call is decided at x + max_request_s (via /s then).
    engine = Engine(store)
    engine.expect_nodes(["A"])
    first = engine.process(make_frame("A", [
        srv("/s", 0, 300), E.thread_spawn(100, 11, 12, t(5)), srv("/early", 12, 15, tid=12),
        cli("/c", 20, 30, tid=12), E.task_exit(100, 12, t(31)), E.watermark(t(900))]))
    assert "C/c@A" not in {label(s) for s in first}
    out = engine.process(make_frame("A", [E.watermark(t(10_100))]))
    spans = {label(s): s for s in out}
    assert spans["C/c@A"].parent_span_id == next(s for s in first if label(s) == "S/s@A").span_id
    assert spans["C/c@A"].link == "spawned_thread"


def test_a_much_reused_tid_is_told_apart_beyond_one_lineage_floor(store: StateStore) -> None:
    # After the worker exits its tid is spawned and exits six more times before C.end + 0.5 s:
    # more lineage records than one floor query returns. The earliest request on the lane is
    # then checked on its own: it came after the worker ended, so the call still joins /s now.
    reuse: list[pb.Event] = []
    for k in range(6):
        base = 40 + 20 * k
        reuse += [E.thread_spawn(100, 100, 12, t(base)), srv(f"/r{k}", base + 1, base + 5, tid=12),
                  E.task_exit(100, 12, t(base + 6))]
    engine = Engine(store)
    engine.expect_nodes(["A"])
    out = engine.process(make_frame("A", [
        srv("/s", 0, 300), E.thread_spawn(100, 11, 12, t(10)), cli("/c", 20, 30, tid=12),
        E.task_exit(100, 12, t(31)), *reuse, E.watermark(t(900))]))
    spans = {label(s): s for s in out}
    assert spans["C/c@A"].parent_span_id == spans["S/s@A"].span_id
    assert spans["C/c@A"].link == "spawned_thread"
