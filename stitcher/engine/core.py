"""The join engine: frames of raw events in, finished spans out, all state in a StateStore.

How one frame is handled (`Engine.process`):

1. *Ingest*: every event becomes merge ops — HTTP requests are recorded once (keyed by their
   deterministic span id, so duplicates are no-ops) and indexed for the joins; thread, goroutine
   and process records are merged; the node's watermark is raised.
2. *Sweep*: the low watermark L is the oldest watermark of the nodes still heard from (a node
   whose watermark lags the newest by `node_timeout_s` is no longer waited for). Each request's
   parent question is scheduled at a threshold time T; once L ≥ T it is settled, looking only at
   candidates whose own time is ≤ T — all of them are in the store by then, whatever the
   interleaving of the nodes' streams, so the answer is always the same.
     * client C (start x): T = max(x + max_request_s, C.end); parent = the one server request on
       C's thread (or goroutine), else on the nearest ancestor by clone / `go` lineage, that
       contains x. Two candidates on one level (event loops) → no link, counted as ambiguous.
       So that spans do not wait max_request_s, the question is first asked at
       T1 = C.end + in_process_wait_s over the requests ended by then, and answered only if
       the answer cannot change (see `_client_parent_early`); else it waits for T. Requests
       that a reused tid served after the calling thread ended do not count as its own (so
       fan-out worker threads are decided at T1).
       In a Go process (ProcessInfo.runtime "go") goroutines move between OS threads, so the
       thread / clone rule would give wrong parents: there a client's in-process parent comes
       only from goroutine lineage (goid on both sides). A Go client without a goid is an
       orphan (`weft.no_goroutine`, counted in stats.go_unlinked), never linked by thread.
       Whether the process is Go is read from the ProcessInfo records with ts <= the decision
       time (T1 or T): all of them are in the store by then, so the answer is deterministic;
       none by then means thread rules.
     * server S: T = S.end + link_wait_s; parent = the client its incoming traceparent names
       (a Weft client that injected that span id, else the foreign span itself); else the client
       with the same TCP seq and fingerprint within seq_window_s (tuple equal: "cross_node",
       tuple different: "nat"); else the one client on the same connection tuple that contains S
       within the skew bound ("tuple"), among clients without a seq when S has one.
3. *Traces*: a span's trace is its root's (hash of the root span id) or the incoming
   traceparent's, with that traceparent's sampled flag (Span.remote_sampled, what a
   parent-based sampler decides by) carried down the trace; a decided span waits (in its
   parent's `kids` set) until its parent's trace is known, then is emitted exactly once (the
   record's `out` field). A span deeper than max_trace_depth or starting max_trace_duration_s
   after its root starts a new trace instead (attribute weft.split_from names the parent it
   would have had; counted). The bounds are depth and duration, not a span count: whether "the
   N+1th span" of a trace is cut would depend on the order decisions happen in, and output must
   not. A parent cycle (malformed input only) is cut at `flush()`: its spans become roots
   flagged weft.unresolved.

Lost requests: a pb.LostRequest (the kernel had no room for a request's record; the agent
passes on its thread, connection and times) is indexed as a candidate like any request but is
never a span. A question it answers alone gets no link (flag weft.parent_lost); beside another
candidate it makes the question ambiguous. So a lost record costs recall, never precision: an
event-loop thread serving two requests when a call starts is not taken for serving one because
the other's record was lost. Records lost with no marker at all come as a pb.BlindSpan (from,
until) of their node: no call of that node in it or up to max_request_s before it gets an
in-process link (flag weft.records_lost); cross-node links, exact matches, stand.

Late events: an HTTP request whose end is at or before the point already swept (possible only
when its node had been timed out, or an agent broke its own watermark promise) cannot join
decisions already made. It is exported at once as its own root with `weft.link=orphan` and
`weft.late=true`, and counted in `stats.late`. Duplicated events (same span id) change nothing.

The engine has no I/O and no clock: time is event time. `flush()` settles everything left
(end of a capture file).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas import weft_events_pb2 as pb
from stitcher.engine.config import EngineConfig
from stitcher.engine.ids import parse_traceparent, root_trace_id, span_id_hex, traceparent_sampled
from stitcher.engine.lineage import (
    Hop,
    ended_by,
    goroutine_parent,
    incarnation_end,
    lineage_member,
    thread_incarnation,
)
from stitcher.engine.model import Resource, Span
from stitcher.engine.paths import PathPatterns, split_list
from stitcher.engine.records import (
    ANY_FINGERPRINT,
    BLIND,
    DUE_INDEX,
    EXPECT,
    LOST,
    META,
    OUTBOX,
    ROLE_CLIENT,
    ROLE_SERVER,
    SEP,
    WAITING,
    WM,
    Http,
    canonical_tuple,
    due_key,
    inj_key,
    kids_key,
    n20,
    proc_prefix,
    proc_record,
    seq_key,
    span_key,
    tuple_key,
)
from stitcher.engine.spans import CUT, SPLIT, http_span, process_resource
from stitcher.engine.store import FLOOR_LIMIT, HSetNX, StateStore
from stitcher.engine.txn import NotLoadedError, Txn, open_txn

FOREVER_NS = (1 << 63) - 1
_IN_PROCESS = frozenset({"thread", "spawned_thread", "goroutine"})
_ZERO = n20(0)
_EV_CACHE_MAX = 500_000
# The last field of a span's `tr` in a trace that came in from outside: the sampled flag of the
# traceparent it came with, handed down to every span of the trace (Span.remote_sampled).
_REMOTE_MARKS = {"r1": True, "r0": False}
# ... or of a trace whose first request was to an ignored route (EngineConfig.ignore_routes):
# handed down the same way, and no span of it is emitted.
IGNORED_MARK = "ig"
_INHERITED_MARKS = frozenset((*_REMOTE_MARKS, IGNORED_MARK))
_IGNORED_TAIL = "|" + IGNORED_MARK
_DETACHED = frozenset((SPLIT, CUT))   # ... or the span's own: it left its parent's trace


@dataclass
class EngineStats:
    frames: int = 0
    events: int = 0
    http: int = 0
    duplicates: int = 0
    invalid: int = 0        # HTTP events without a role or with end < start
    late: int = 0
    ambiguous: int = 0
    go_unlinked: int = 0    # Go clients without a goroutine id: never linked by thread
    trace_splits: int = 0
    ignored: int = 0        # spans of traces whose first request was to an ignored route
    unresolved: int = 0     # spans in a parent cycle, cut loose at flush()
    decided: int = 0
    emitted: int = 0
    nodes_timed_out: int = 0
    trace_mismatch: int = 0  # spans whose Weft-injected trace differs from their parent's
    lost_requests: int = 0  # requests the agent could not capture (LostRequest): candidates only
    parent_lost: int = 0    # spans whose parent is one of those: no link (weft.parent_lost)
    blind: int = 0          # in-process links refused inside a node's BlindSpan (weft.records_lost)
    links: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        flat = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        flat.update({f"link.{k}": v for k, v in sorted(self.links.items())})
        return flat


# one HTTP event of a frame: (span id, record, message)
_FrameHttp = tuple[str, Http, pb.HttpRequest]
# a span just decided: (span id, record, parent span id, external trace id) — what its `dec`
# field says, handed on so that trace resolution need not read and split it again
_Decided = tuple[str, Http, str, str]


class Engine:
    """Stitch frames into spans. One instance per consumer; all join state lives in `store`."""

    def __init__(self, store: StateStore, config: EngineConfig | None = None) -> None:
        self.store = store
        self.config = (config or EngineConfig()).validate()
        self.stats = EngineStats()
        c = self.config
        self._max_req = c.max_request_ns
        self._early = c.in_process_wait_ns
        self._skew = c.skew_ns
        self._link_wait = c.link_wait_ns
        self._seq_window = c.seq_window_ns
        self._timeout = c.node_timeout_ns
        self._due_w = c.due_bucket_ns
        self._max_depth = c.max_trace_depth
        self._max_duration = c.max_trace_duration_ns   # a property: computed once, read per span
        self._ignore = PathPatterns(split_list(c.ignore_routes))
        # Decoded request records by span id. They never change once written (HSetNX of a
        # deterministic value), so the cache stays valid across frames and workers.
        self._ev_cache: dict[str, Http] = {}
        self._lane_entries: dict[str, tuple[int, int, str]] = {}   # same: members never change
        self._expected_heard = 0
        self._resources: dict[tuple[str, int, tuple[str, str]], Resource] = {}
        # `weft stitch` sets this: emitted span ids go to OUTBOX in the same commit that marks
        # them `out`, until `acknowledge()` (after the export flushed). See `unacknowledged()`.
        self.outbox = False
        # The consumer sets this while it has unread messages on some partition (catching up
        # after a restart, a replay, or a burst): a node whose frames are merely unread must not
        # be timed out, or its events would all arrive "late". See `_low_watermark`.
        self.hold_node_timeouts = False
        # Event time as of the last batch, for the worker's metrics: each node's newest
        # watermark (ns) and the low watermark the sweep settled questions up to.
        self._watermarks: Mapping[str, str] = {}
        self.low_watermark_ns = 0

    # ------------------------------------------------------------------------------- ingest

    def process(self, frame: pb.Frame) -> list[Span]:
        """Apply one frame (one node's events, in agent order) and return the spans it finished."""
        return self.process_frames((frame,))

    def process_frames(self, frames: Sequence[pb.Frame]) -> list[Span]:
        """Apply several frames (of any nodes; each node's in agent order) as one batch: one
        load of what they name, one sweep, one store `apply`. The output over a whole stream
        is the same however it is cut into batches (decisions depend only on event time), so
        a consumer may hand over whatever it has buffered; a batch is also committed as one
        unit (a failed `apply` wrote none of it)."""
        txn = open_txn(self.store)
        frame_https = [self._frame_https(frame) for frame in frames]
        if txn.batched:
            txn.load(hashes=[WM, META, EXPECT, *(span_key(x[0]) for xs in frame_https for x in xs if x)],
                     sets=[BLIND])
        swept = int(txn.hash(META).get("swept", "0"))
        late: list[_Decided] = []
        due: dict[int, list[str]] = {}     # this batch's scheduled questions, by due bucket
        marks: dict[str, int] = {}
        for frame, https in zip(frames, frame_https, strict=True):
            node = frame.node
            marks[node] = max(marks.get(node, 0),
                              self._ingest_frame(txn, node, frame.events, https, swept, late, due))
        if due:
            for bucket, questions in due.items():
                txn.sadd(due_key(bucket), tuple(questions))
            txn.sadd(DUE_INDEX, tuple(sorted(str(b) for b in due)))
        for node, watermark in marks.items():
            txn.hmax(WM, node, n20(watermark))  # also registers a node with no watermark yet
        wm = txn.hash(WM)
        low = self._low_watermark(wm, txn.hash(EXPECT))
        self._watermarks = dict(wm)     # a copy: the store's own dict changes under a direct store
        self.low_watermark_ns = low
        decided = late + self._sweep(txn, low, swept)
        out = self._resolve_traces(txn, decided)
        txn.commit()
        if len(self._ev_cache) > _EV_CACHE_MAX:
            self._ev_cache.clear()
            self._lane_entries.clear()
            self._resources.clear()
        return out

    def node_watermarks(self) -> dict[str, int]:
        """Each node's newest watermark (ns) as of the last batch (0: expected, not heard yet)."""
        return {node: int(value) for node, value in self._watermarks.items()}

    def span_ids(self, frame: pb.Frame) -> list[str | None]:
        """The span id (hex) the engine gives each event of `frame`; None for non-requests."""
        return [x[0] if x else None for x in self._frame_https(frame)]

    @staticmethod
    def _frame_https(frame: pb.Frame) -> list[_FrameHttp | None]:
        """Per event of the frame: (span id, record, message) of an HTTP request, else None.
        Each request's fields are read from protobuf once, here (a batched store needs the
        span ids before ingesting, to load their records in one round trip)."""
        node = frame.node
        out: list[_FrameHttp | None] = []
        for ev in frame.events:
            if ev.WhichOneof("kind") != "http":
                out.append(None)
                continue
            h = ev.http
            rec = Http.from_pb(node, h)
            # WEFT-INJECT: the ids Weft put on the wire are the span's (a server keeps the
            # context it was assigned like a client keeps the one it sent)
            if rec.role == ROLE_SERVER:
                assigned = h.assigned_traceparent
                if assigned:
                    rec = rec._replace(injected=assigned)
                own = parse_traceparent(assigned) if assigned else None
            else:
                sent = h.injected_traceparent
                own = parse_traceparent(sent) if sent else None
            out.append((own[1] if own else span_id_hex(node, rec.pid, rec.cookie, rec.role, rec.start),
                        rec, h))
        return out

    def _ingest_frame(self, txn: Txn, node: str, events: Sequence[pb.Event],
                      https: list[_FrameHttp | None], swept: int, late: list[_Decided],
                      due: dict[int, list[str]]) -> int:
        """Record one frame's events; returns the frame's newest watermark (0: none)."""
        stats = self.stats
        stats.frames += 1
        stats.events += len(events)
        watermark = 0
        for ev, http in zip(events, https, strict=True):
            if http is not None:
                self._ingest_http(txn, node, *http, swept, late, due)
                continue
            kind = ev.WhichOneof("kind")
            if kind == "watermark":
                watermark = max(watermark, ev.watermark.ts_ns)
            elif kind == "process":
                p = ev.process
                txn.hsetnx(proc_prefix(node, p.pid) + ":proc", n20(p.ts_ns), proc_record(p))
            elif kind == "thread_spawn":
                t = ev.thread_spawn
                if not t.new_process and t.child_pid == t.parent_pid and t.child_tid != t.parent_tid:
                    txn.zadd(f"{proc_prefix(node, t.child_pid)}:lin:{t.child_tid}",
                             *lineage_member(t.ts_ns, t.parent_tid))
            elif kind == "task_exit":
                x = ev.task_exit
                txn.zadd(f"{proc_prefix(node, x.pid)}:lin:{x.tid}", *lineage_member(x.ts_ns, None))
            elif kind == "goroutine_spawn":
                g = ev.goroutine_spawn
                txn.hsetnx(f"{proc_prefix(node, g.pid)}:go:{g.child_goid}", "p",
                           f"{g.parent_goid}|{g.ts_ns}")
            elif kind == "lost_http":
                self._ingest_lost(txn, node, ev.lost_http, swept)
            elif kind == "blind":
                b = ev.blind
                if b.until_ns >= b.ts_ns:
                    txn.sadd(BLIND, (f"{node}|{b.ts_ns}|{b.until_ns}",))
        return watermark

    def _ingest_lost(self, txn: Txn, node: str, lost: pb.LostRequest, swept: int) -> None:
        """A request the agent knows happened but could not capture goes into the same indexes
        as a captured one, under a span id marked LOST (never a span itself): a question that
        finds it as the only answer gets no link, and one that finds it beside another is
        ambiguous — as it would have been had the record not been lost."""
        start, end, role = lost.start_ns, lost.end_ns, lost.role
        if invalid_reason(role, start, end):
            self.stats.invalid += 1
            return
        self.stats.lost_requests += 1
        if end <= swept:
            return          # every question it could answer is settled
        sid = LOST + span_id_hex(node, lost.pid, lost.sock_cookie, role, start)
        if role == ROLE_SERVER:
            _index_server(txn, node, lost.pid, lost.goid, lost.tid, start, end, sid)
            return
        t = lost.tuple
        canon = canonical_tuple(role, t.local_addr.hex(), t.local_port, t.remote_addr.hex(), t.remote_port)
        # its method and path are lost too: it matches any fingerprint
        _index_client(txn, canon, lost.has_seq, lost.tcp_seq, ANY_FINGERPRINT, start, end, sid)

    def flush(self) -> list[Span]:
        """End of input: settle every open question as if all watermarks had passed."""
        txn = open_txn(self.store)
        swept = int(txn.hash(META).get("swept", "0"))
        out = self._resolve_traces(txn, self._sweep(txn, FOREVER_NS, swept))
        out += self._break_cycles(txn)
        txn.commit()
        if len(self._ev_cache) > _EV_CACHE_MAX:
            self._ev_cache.clear()
            self._lane_entries.clear()
        return out

    def _break_cycles(self, txn: Txn) -> list[Span]:
        """After everything was decided, a span still waiting for its parent's trace sits in a
        parent cycle (only malformed input, e.g. traceparents naming each other, makes one).
        Each becomes the root of its own trace, flagged weft.unresolved, rather than be lost."""
        stuck = sorted(txn.members(WAITING))
        if not stuck:
            return []
        if txn.batched:
            txn.load(hashes=[span_key(sid) for sid in stuck])
        roots = [sid for sid in stuck if "tr" not in txn.hash(span_key(sid))]
        cut: list[tuple[str, Http]] = []
        for sid in roots:
            rec = self._event(txn, sid)
            if rec is not None:
                trace = root_trace_id(bytes.fromhex(sid)).hex()
                txn.hsetnx(span_key(sid), "tr", f"{trace}|0|{rec.start}|{CUT}")
                cut.append((sid, rec))
        txn.srem(WAITING, tuple(stuck))
        self.stats.unresolved += len(roots)
        return self._emit(txn, cut)

    def _ingest_http(self, txn: Txn, node: str, sid: str, rec: Http, h: pb.HttpRequest, swept: int,
                     late: list[_Decided], due: dict[int, list[str]]) -> None:
        stats = self.stats
        rec_key = span_key(sid)
        if "ev" in txn.hash(rec_key):
            stats.duplicates += 1
            return
        role = rec.role
        if invalid_reason(role, rec.start, rec.end):
            stats.invalid += 1
            return
        stats.http += 1
        txn.hsetnx(rec_key, "ev", rec.encode())
        self._ev_cache[sid] = rec
        start, end = rec.start, rec.end
        if end <= swept:
            stats.late += 1
            txn.hsetnx(rec_key, "dec", "|orphan||late")
            late.append((sid, rec, "", ""))
            return
        if role == ROLE_SERVER:
            _index_server(txn, node, rec.pid, rec.goid, rec.tid, start, end, sid)
            threshold = end + self._link_wait
        else:
            _index_client(txn, rec.canon_tuple(), rec.has_seq, rec.seq, rec.fingerprint, start, end, sid)
            if rec.injected:
                tp = parse_traceparent(rec.injected)
                if tp is not None:
                    txn.sadd(inj_key(tp[1]), (f"{end}|{sid}",))
            threshold = max(start + self._max_req, end)
            early = end + self._early
            if early < threshold:
                question = f"{early:020d}|{sid}|e"      # the early in-process question
                bucket = early // self._due_w
                if bucket in due:
                    due[bucket].append(question)
                else:
                    due[bucket] = [question]
                return
        bucket = threshold // self._due_w
        if bucket in due:
            due[bucket].append(f"{threshold:020d}|{sid}")
        else:
            due[bucket] = [f"{threshold:020d}|{sid}"]

    def _schedule(self, txn: Txn, threshold: int, sid: str) -> None:
        """Ask `sid`'s parent question (again) at `threshold` (the batch's new requests are
        scheduled together instead: see `process_frames`)."""
        bucket = threshold // self._due_w
        txn.sadd(due_key(bucket), (f"{n20(threshold)}|{sid}",))
        txn.sadd(DUE_INDEX, (str(bucket),))

    def expect_nodes(self, nodes: Iterable[str]) -> None:
        """Wait for these nodes from the start, even before their first watermark arrives (a
        node otherwise counts only once it sent one). Use when the node set is known up front,
        as in a rebuild from capture files: then no interleaving makes one node's events late."""
        self.store.apply([HSetNX(EXPECT, node, "1") for node in sorted(set(nodes))])

    def _low_watermark(self, marks: Mapping[str, str], expected: Mapping[str, str]) -> int:
        """Oldest watermark among the nodes still waited for: nodes that sent one and do not
        lag the newest by node_timeout_s, and expected nodes not heard from yet. (Values are
        fixed-width, so they compare as strings.)"""
        if not marks:
            return 0
        if len(expected) > self._expected_heard:   # monotone: a heard node stays heard
            if any(marks.get(node, _ZERO) == _ZERO for node in expected):
                return 0
            self._expected_heard = len(expected)
        # Runs once per frame over every node: the usual case (all heard, none timed out) is
        # two C-level passes; the list of heard nodes is built only when one is not.
        oldest, newest = min(marks.values()), max(marks.values())
        if newest == _ZERO:
            return 0
        cutoff = n20(max(int(newest) - self._timeout, 0))
        if oldest != _ZERO and oldest >= cutoff:
            self.stats.nodes_timed_out = 0
            return int(oldest)
        heard = [v for v in marks.values() if v != _ZERO]
        oldest = min(heard)
        if oldest >= cutoff or self.hold_node_timeouts:
            self.stats.nodes_timed_out = 0
            return int(oldest)
        alive = [v for v in heard if v >= cutoff]
        self.stats.nodes_timed_out = len(heard) - len(alive)
        return int(min(alive))

    # -------------------------------------------------------------------------------- sweep

    def _sweep(self, txn: Txn, low: int, swept: int) -> list[_Decided]:
        """Settle the scheduled questions of every due bucket that `low` has completed (so a
        question is settled at its threshold rounded up to the bucket end); returns the newly
        decided span ids. `swept` is the last threshold already settled."""
        width = self._due_w
        ready = (low + 1) // width                # buckets < ready are complete
        if ready * width - 1 <= swept:
            return []
        buckets = sorted(b for b in (int(m) for m in txn.members(DUE_INDEX)) if b < ready)
        txn.load(sets=[due_key(b) for b in buckets])
        items: list[str] = []
        for b in buckets:
            items.extend(txn.members(due_key(b)))
        items.sort()
        upto = ready * width - 1
        decided: list[_Decided] = []
        todo = [(int(f[0]), f[1], len(f) > 2) for f in (m.split("|") for m in items)]
        while todo:
            now, deferred = self._decide(txn, todo)
            decided += now
            # deferred questions due inside this sweep are settled now; later ones scheduled
            todo = [(thr, sid, False) for thr, sid in deferred if thr <= upto]
            for thr, sid in deferred:
                if thr > upto:
                    self._schedule(txn, thr, sid)
        for b in buckets:
            txn.delete(due_key(b))
        if buckets:
            txn.srem(DUE_INDEX, tuple(str(b) for b in buckets))
        txn.hmax(META, "swept", n20(min(upto, FOREVER_NS)))
        self._prune_blind_spans(txn, upto)
        return decided

    def _prune_blind_spans(self, txn: Txn, swept: int) -> None:
        """Forget BlindSpans that ended max_trace_duration_s before the point swept: no later
        decision looks at them (see `_in_blind_span`)."""
        members = txn.members(BLIND)
        if members:
            horizon = swept - self._max_duration
            old = tuple(sorted(m for m in members if int(m.rsplit("|", 1)[1]) < horizon))
            if old:
                txn.srem(BLIND, old)

    def _lane_entry(self, member: str) -> tuple[int, int, str]:
        """(start, end, span id) of a lane member "<start>|<end>|<sid>", parsed once: floor
        queries return the same members again and again."""
        s_s, e_s, ssid = member.split("|")
        entry = self._lane_entries[member] = (int(s_s), int(e_s), ssid)
        return entry

    def _event(self, txn: Txn, sid: str) -> Http | None:
        rec = self._ev_cache.get(sid)
        if rec is None:
            text = txn.hash(span_key(sid)).get("ev")
            if text is None:
                return None
            rec = self._ev_cache[sid] = Http.decode(text)
        return rec

    def _decide(self, txn: Txn, items: list[tuple[int, str, bool]]
                ) -> tuple[list[_Decided], list[tuple[int, str]]]:
        """Settle the questions `items` (threshold, span id, early?); returns the span ids
        decided and the early questions deferred to their full threshold."""
        if txn.batched:
            txn.load(hashes=[span_key(sid) for _, sid, _ in items])
        todo: list[tuple[int, str, Http]] = []
        early_sids: set[str] = set()
        for thr, sid, early in items:
            if "dec" in txn.hash(span_key(sid)):
                continue  # settled before (a redelivered frame scheduled it again)
            rec = self._event(txn, sid)
            if rec is not None:
                todo.append((thr, sid, rec))
                if early:
                    early_sids.add(sid)
        if not todo:
            return [], []
        clients = [(sid, rec) for _, sid, rec in todo if rec.role == ROLE_CLIENT]
        if txn.batched and clients:
            txn.load(hashes=sorted({proc_prefix(rec.node, rec.pid) + ":proc" for _, rec in clients}))
        # Go multiplexes goroutines over OS threads: in a Go process only goroutine lineage
        # may give a client its in-process parent, never the OS thread or clone lineage.
        threadless = {sid for thr, sid, rec in todo if rec.role == ROLE_CLIENT and not rec.goid
                      and _runtime(txn.hash(proc_prefix(rec.node, rec.pid) + ":proc"), thr) == "go"}
        chains = self._chains(txn, [(sid, rec) for sid, rec in clients if sid not in threadless])
        if txn.batched:
            self._preload_candidates(txn, [x for x in todo if x[1] not in threadless], chains, early_sids)
        answers = self._answers(txn, [x for x in todo if x[1] not in threadless], chains, early_sids)
        decided: list[_Decided] = []
        deferred: list[tuple[int, str]] = []
        stats = self.stats
        blind = self._blind_spans(txn)
        for thr, sid, rec in todo:
            if sid in threadless:
                parent, link, ext, flag = "", "orphan", "", "no_goroutine"
                stats.go_unlinked += 1
            else:
                answer = answers[sid]
                if answer is None:     # the early question could not be answered yet
                    deferred.append((max(rec.start + self._max_req, rec.end), sid))
                    continue
                parent, link, ext, flag = answer
                if parent.startswith(LOST):
                    parent, link, ext, flag = "", "orphan", "", "parent_lost"
                    stats.parent_lost += 1
                elif blind and link in _IN_PROCESS and self._in_blind_span(blind, rec, thr):
                    parent, link, ext, flag = "", "orphan", "", "records_lost"
                    stats.blind += 1
            if flag == "ambiguous":
                stats.ambiguous += 1
            stats.links[link] += 1
            stats.decided += 1
            txn.hsetnx(span_key(sid), "dec", f"{parent}|{link}|{ext}|{flag}")
            decided.append((sid, rec, parent, ext))
        return decided, deferred

    def _blind_spans(self, txn: Txn) -> dict[str, list[tuple[int, int]]]:
        """Each node's BlindSpans, (from, until), if any node reported one."""
        members = txn.members(BLIND)
        if not members:
            return {}
        spans: dict[str, list[tuple[int, int]]] = {}
        for member in members:
            node, lo, hi = member.rsplit("|", 2)
            spans.setdefault(node, []).append((int(lo), int(hi)))
        return spans

    def _in_blind_span(self, blind: dict[str, list[tuple[int, int]]], rec: Http, thr: int) -> bool:
        """Whether a request lost without a trace may have held the call `rec` on its node: one
        that ended in a BlindSpan (from, until) contains x = rec.start only if x <= until and,
        lasting at most max_request_s, x >= from - max_request_s. Only spans starting by the
        decision's threshold count (all of those are in the store by then, whatever the
        interleaving) and none that ended max_trace_duration_s before it (they may have been
        pruned), so the answer is always the same."""
        x, oldest = rec.start, thr - self._max_duration
        return any(lo <= thr and hi >= oldest and lo - self._max_req <= x <= hi
                   for lo, hi in blind.get(rec.node, ()))

    def _answers(self, txn: Txn, todo: list[tuple[int, str, Http]], chains: dict[str, list[Hop]],
                 early_sids: set[str]) -> dict[str, tuple[str, str, str, str] | None]:
        """Each question's answer (None: an early question that must wait). The answers only
        read the store. On a batched store, the floors only some answers read (a fuller lane,
        lineage to tell thread incarnations apart, a server's tuple when its seq did not
        decide) are not preloaded: questions that reach one not loaded yet are asked again
        after one load of all of them, so rarely needed reads cost one round trip per round
        instead of a preload for every question."""
        answers: dict[str, tuple[str, str, str, str] | None] = {}
        pending = todo
        txn.only_loaded = txn.batched
        try:
            while pending:
                missing: list[tuple[str, int]] = []
                again: list[tuple[int, str, Http]] = []
                for item in pending:
                    thr, sid, rec = item
                    try:
                        if sid in early_sids:
                            answers[sid] = self._client_parent_early(txn, thr, rec, chains[sid])
                        elif rec.role == ROLE_CLIENT:
                            answers[sid] = self._client_parent(txn, thr, rec, chains[sid])
                        else:
                            answers[sid] = self._server_parent(txn, thr, rec)
                    except NotLoadedError as exc:
                        missing.append(exc.floor)
                        again.append(item)
                if missing:
                    txn.load(floors=missing)
                pending = again
        finally:
            txn.only_loaded = False
        return answers

    def _preload_candidates(self, txn: Txn, todo: list[tuple[int, str, Http]],
                            chains: dict[str, list[Hop]], early_sids: set[str]) -> None:
        """One load for the index entries every decision below reads (see `_answers`)."""
        skew = self._skew
        index_keys: list[str] = []
        floors: list[tuple[str, int]] = []
        for thr, sid, rec in todo:
            if rec.role == ROLE_CLIENT:
                # the early question reads the lane at t1 first, the full one at x; most
                # answers come from the client's own lane (ancestors' lanes load on demand)
                hop = chains[sid][0]
                at = (thr if sid in early_sids else rec.start) // 1000
                floors.append((f"{proc_prefix(rec.node, rec.pid)}:{'g' if rec.goid else 't'}{hop.ident}", at))
                continue
            tp = parse_traceparent(rec.traceparent) if rec.traceparent else None
            if tp is not None:
                index_keys.append(inj_key(tp[1]))
                continue
            if rec.has_seq:
                index_keys.append(seq_key(rec.seq))
            if not (rec.has_seq and self.config.link_by_seq) and self.config.link_by_tuple:
                floors.append((tuple_key(rec.canon_tuple()), (rec.start + skew) // 1000))
        txn.load(sets=index_keys, floors=floors)

    def _chains(self, txn: Txn, clients: list[tuple[str, Http]]) -> dict[str, list[Hop]]:
        """Ancestry of each client's thread (or goroutine) at its start, one batched load per
        level for all clients together."""
        chains: dict[str, list[Hop]] = {sid: [] for sid, _ in clients}
        # per open walk: (sid, record, ident at this level, time the level below was spawned)
        walks = [(sid, rec, rec.goid or rec.tid, rec.start) for sid, rec in clients]
        for level in range(self.config.max_lineage_depth):
            if not walks:
                break
            keys = [f"{proc_prefix(rec.node, rec.pid)}:{'go' if rec.goid else 'lin'}:{ident}"
                    for _, rec, ident, _ in walks]
            if txn.batched:
                txn.load(hashes=[k for k, w in zip(keys, walks, strict=True) if w[1].goid],
                         floors=[(k, w[3] // 1000) for k, w in zip(keys, walks, strict=True)
                                 if not w[1].goid])
            following = []
            for key, (sid, rec, ident, when) in zip(keys, walks, strict=True):
                if rec.goid:
                    chains[sid].append(Hop(ident, 0, level, when if level else 0))
                    found = goroutine_parent(txn.hash(key))
                    if found is not None and found[0] not in (0, ident):
                        following.append((sid, rec, found[0], found[1]))
                elif ident == rec.pid:           # the main thread: no spawn record to look for
                    chains[sid].append(Hop(ident, 0, level, when if level else 0))
                else:
                    since, parent = thread_incarnation(txn.floor(key, when // 1000), when)
                    chains[sid].append(Hop(ident, since, level, when if level else 0))
                    if parent is not None and parent != ident:
                        following.append((sid, rec, parent, since))
            walks = following
        return chains

    def _client_parent_early(self, txn: Txn, t1: int, rec: Http, hops: list[Hop]
                             ) -> tuple[str, str, str, str] | None:
        """The early question, at t1 = C.end + in_process_wait_s, over requests that ended by
        t1. Answers only when the answer cannot change by the full threshold: exactly one
        candidate on a lane that shows no overlapping requests (a thread serving one request
        at a time cannot have another one containing x still running), or two candidates
        (ambiguous already). Otherwise None: ask again at the full threshold.

        With `early_roots`, a call whose thread (and ancestors) never served a request that
        ended by t1 is a root now: a client-only thread (load generator, cron job, CLI). The
        price: a brand-new thread or goroutine whose *first* request keeps running longer than
        in_process_wait_s after its call returned loses that link (recall, never precision).

        A lane's requests count only while they belong to the thread incarnation that made
        the call (or spawned the level below): those that started after it ended (exit, or its
        tid spawned again, by t1) were served by a later thread with the same tid. A fan-out
        worker thread that exited, and whose tid then served a request, has still served
        nothing itself: its lane is passed over and the call joins its creator's request now."""
        x = rec.start
        prefix = proc_prefix(rec.node, rec.pid)
        tag = "g" if rec.goid else "t"
        served = False
        entries = self._lane_entries
        for hop in hops:
            lane = f"{prefix}:{tag}{hop.ident}"
            seen: dict[str, tuple[int, int]] = {}
            latest = txn.floor(lane, t1 // 1000)
            # the floor at t1 holds every entry up to t1 unless it is full: only then can the
            # floor at x add any
            if len(latest) >= FLOOR_LIMIT and x // 1000 != t1 // 1000:
                latest = [*txn.floor(lane, x // 1000), *latest]
            since = hop.since_ns
            for _, member in latest:
                s, e, ssid = entries.get(member) or self._lane_entry(member)
                if e <= t1:          # later ones may or may not have arrived: never look at them
                    served = True
                    if s >= since:
                        seen[ssid] = (s, e)
            found = [ssid for ssid, (s, e) in seen.items() if s <= x <= e and (
                hop.level == 0 or s <= hop.spawned_at_ns)]
            if len(found) > 1:
                return "", "orphan", "", "ambiguous"
            if not seen:
                continue                       # this lane never served: look further up
            if not found or _overlapping(sorted(seen.values())):
                # Requests of later incarnations of the tid never contain x (they start after
                # this one ended), so `found` stands; without them the lane may show that
                # this thread never served (look further up) or no overlap after all.
                if rec.goid or hop.ident == rec.pid:
                    return None
                seen = self._this_incarnation(txn, prefix, rec, hop, t1, seen)
                if not seen:
                    continue
                if not found or _overlapping(sorted(seen.values())):
                    return None
            link = "thread" if hop.level == 0 else ("goroutine" if rec.goid else "spawned_thread")
            return found[0], link, "", ""
        if not served and self.config.early_roots:
            return "", "root", "", ""
        return None

    @staticmethod
    def _this_incarnation(txn: Txn, prefix: str, rec: Http, hop: Hop, t1: int,
                          seen: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """The lane requests `seen` less those served after the thread incarnation of `hop`
        ended (by a later thread with the same tid). Exact when the lineage floor at t1 shows
        the end; else the earliest request is checked with a floor at its own start (if the
        incarnation had ended by then it served none of them). Requests that stay in by
        doubt only make the early answer wait, never change it."""
        lin = f"{prefix}:lin:{hop.ident}"
        alive_at = hop.spawned_at_ns if hop.level else rec.start
        end, exact = incarnation_end(txn.floor(lin, t1 // 1000), alive_at, t1)
        if end is None:
            return seen
        if not exact:
            first = min(s for s, _ in seen.values())
            if ended_by(txn.floor(lin, first // 1000), alive_at, first):
                return {}
        return {ssid: (s, e) for ssid, (s, e) in seen.items() if s < end}

    def _client_parent(self, txn: Txn, thr: int, rec: Http, hops: list[Hop]) -> tuple[str, str, str, str]:
        # Candidates: the server requests on this lane that started last before x (a floor
        # query, FLOOR_LIMIT deep: on a thread that serves one request at a time the first is
        # the one; more that contain x mean an event loop → ambiguous).
        x = rec.start
        prefix = proc_prefix(rec.node, rec.pid)
        tag = "g" if rec.goid else "t"
        entries = self._lane_entries
        for hop in hops:
            found: list[str] = []
            for _, member in txn.floor(f"{prefix}:{tag}{hop.ident}", x // 1000):
                s, e, ssid = entries.get(member) or self._lane_entry(member)
                if s <= x <= e and e <= thr and s >= hop.since_ns and (
                        hop.level == 0 or s <= hop.spawned_at_ns):
                    found.append(ssid)
            if len(found) == 1:
                link = "thread" if hop.level == 0 else ("goroutine" if rec.goid else "spawned_thread")
                return found[0], link, "", ""
            if found:
                return "", "orphan", "", "ambiguous"
        return "", "root", "", ""

    def _server_parent(self, txn: Txn, thr: int, rec: Http) -> tuple[str, str, str, str]:
        tp = parse_traceparent(rec.traceparent) if rec.traceparent else None
        if tp is not None:
            injected = [m.split("|")[1] for m in txn.members(inj_key(tp[1])) if int(m.split("|")[0]) <= thr]
            if len(injected) == 1:
                return injected[0], "traceparent", "", ""
            return tp[1], "traceparent", tp[0], ""
        canon = rec.canon_tuple()
        if rec.has_seq and self.config.link_by_seq:
            fingerprint, window, start = rec.fingerprint, self._seq_window, rec.start
            matches: list[tuple[str, bool]] = []
            for member in txn.members(seq_key(rec.seq)):
                s_s, e_s, csid, ccanon, fp = member.split("|", 4)
                if fp in (fingerprint, ANY_FINGERPRINT) and abs(int(s_s) - start) <= window \
                        and int(e_s) <= thr:
                    matches.append((csid, ccanon == canon))
            confirmed = [m for m in matches if m[1]]
            if len(confirmed) == 1:
                return confirmed[0][0], "cross_node", "", ""
            if len(matches) == 1:
                return matches[0][0], "nat", "", ""
            if matches:
                return "", "orphan", "", "ambiguous"
        if not self.config.link_by_tuple:
            return "", "root", "", ""
        skew = self._skew
        found: list[str] = []
        for _, member in txn.floor(tuple_key(canon), (rec.start + skew) // 1000):
            s_s, e_s, csid, c_seq = member.split("|")
            if rec.has_seq and c_seq == "1":
                continue        # both sides saw a seq and they differ: not the same request
            s, e = int(s_s), int(e_s)
            if s - skew <= rec.start and rec.end <= e + skew and e <= thr:
                found.append(csid)
        if len(found) == 1:
            return found[0], "tuple", "", ""
        if found:
            return "", "orphan", "", "ambiguous"
        return "", "root", "", ""

    # ------------------------------------------------------------------------------- traces

    def _trace_below(self, sid: str, rec: Http, parent_tr: str) -> str:
        trace, depth_s, root_start_s, mark = parent_tr.split("|")
        depth, root_start = int(depth_s) + 1, int(root_start_s)
        if depth > self._max_depth or rec.start - root_start > self._max_duration:
            self.stats.trace_splits += 1
            split = IGNORED_MARK if mark == IGNORED_MARK else SPLIT    # still left out
            return f"{root_trace_id(bytes.fromhex(sid)).hex()}|0|{rec.start}|{split}"
        return f"{trace}|{depth}|{root_start}|{mark if mark in _INHERITED_MARKS else ''}"

    def _resolve_traces(self, txn: Txn, decided: list[_Decided]) -> list[Span]:
        """Give decided spans their trace when their parent's is known; emit what got one."""
        if not decided:
            return []
        if txn.batched:
            txn.load(hashes=[span_key(p) for _, _, p, ext in decided if p and not ext])
        traced: list[tuple[str, Http]] = []
        for sid, rec, parent, ext in decided:
            key = span_key(sid)
            own = parse_traceparent(rec.injected) if rec.injected else None  # WEFT-INJECT
            if not parent:
                root_trace = own[0] if own else root_trace_id(bytes.fromhex(sid)).hex()
                tr = f"{root_trace}|0|{rec.start}|{self._root_mark(rec)}"
            elif ext:
                tr = f"{ext}|1|{rec.start}|{self._root_mark(rec) or _remote_mark(rec.traceparent)}"
            else:
                parent_tr = txn.hash(span_key(parent)).get("tr")
                if parent_tr is None:
                    txn.sadd(kids_key(parent), (sid,))
                    txn.sadd(WAITING, (sid,))
                    continue
                tr = self._trace_below(sid, rec, parent_tr)
            if parent and rec.injected:
                self._check_own_trace(rec, tr)
            txn.hsetnx(key, "tr", tr)
            traced.append((sid, rec))
        frontier = [sid for sid, _ in traced]
        while frontier:
            if txn.batched:
                txn.load(sets=[kids_key(p) for p in frontier])
            pairs: list[tuple[str, str]] = []
            for p in frontier:
                kids_of = kids_key(p)
                kids = txn.members(kids_of)
                if kids:
                    pairs.extend((p, k) for k in sorted(kids))
                    txn.delete(kids_of)          # finished: later children find p's trace
            if not pairs:
                break
            if txn.batched:
                txn.load(hashes=[span_key(k) for _, k in pairs])
            following: list[tuple[str, Http]] = []
            for p, kid in pairs:
                kid_rec = txn.hash(span_key(kid))
                if "tr" in kid_rec or kid_rec.get("dec", "|").split("|")[0] != p:
                    continue
                ev = self._event(txn, kid)
                if ev is None:
                    continue
                parent_tr = txn.hash(span_key(p))["tr"]
                kid_tr = self._trace_below(kid, ev, parent_tr)
                if ev.injected:
                    self._check_own_trace(ev, kid_tr)
                txn.hsetnx(span_key(kid), "tr", kid_tr)
                following.append((kid, ev))
            if following:
                txn.srem(WAITING, tuple(kid for kid, _ in following))
            traced.extend(following)
            frontier = [kid for kid, _ in following]
        return self._emit(txn, traced)

    def _root_mark(self, rec: Http) -> str:
        """The first span Weft sees of a trace: IGNORED_MARK when its path is an ignored route."""
        return IGNORED_MARK if self._ignore and self._ignore.match(rec.path) is not None else ""

    def _check_own_trace(self, rec: Http, tr: str) -> None:
        """WEFT-INJECT: a child keeps its parent's trace; when the trace Weft put on the wire for
        it says otherwise (a context that was not this parent's), count it: the link wins."""
        own = parse_traceparent(rec.injected) if rec.injected else None
        if own is not None and not tr.startswith(own[0]):
            self.stats.trace_mismatch += 1

    def _emit(self, txn: Txn, traced: Iterable[tuple[str, Http]]) -> list[Span]:
        """Emit these traced spans (span id, record) unless already out."""
        ready: list[tuple[str, str, Http, Mapping[str, str]]] = []
        for sid, ev in traced:
            key = span_key(sid)
            rec_fields = txn.hash(key)
            if "out" in rec_fields:
                continue
            if rec_fields["tr"].endswith(_IGNORED_TAIL):   # out, but never a span
                txn.hsetnx(key, "out", "1")
                self.stats.ignored += 1
                continue
            ready.append((sid, key, ev, rec_fields))
        if txn.batched:
            txn.load(hashes=[proc_prefix(ev.node, ev.pid) + ":proc" for _, _, ev, _ in ready])
        spans: list[Span] = []
        resources = self._resources
        for sid, key, ev, rec_fields in ready:
            txn.hsetnx(key, "out", "1")
            node, pid = ev.node, ev.pid
            proc = txn.hash(proc_prefix(node, pid) + ":proc")
            if len(proc) == 1:   # the usual case: one ProcessInfo, one Resource object
                (only,) = proc.items()
                resource = resources.get((node, pid, only))
                if resource is None:
                    resource = resources[(node, pid, only)] = process_resource(ev, proc)
            else:
                resource = process_resource(ev, proc)
            spans.append(_span(sid, ev, rec_fields["dec"], rec_fields["tr"], resource))
        if self.outbox and ready:
            txn.sadd(OUTBOX, tuple(sid for sid, _, _, _ in ready))
        self.stats.emitted += len(spans)
        return spans

    def unacknowledged(self) -> list[Span]:
        """The spans in OUTBOX: emitted (marked `out`, so a redelivered frame does not emit
        them again) but never acknowledged as exported — a worker killed between the state
        commit and its export flush leaves them. The next worker exports them again, with the
        same IDs (DESIGN.md: never skip an emit because Redis says it is done). Read-only."""
        txn = open_txn(self.store)
        sids = sorted(txn.members(OUTBOX))
        if txn.batched:
            txn.load(hashes=[span_key(s) for s in sids])
        ready: list[tuple[str, Http, Mapping[str, str]]] = []
        for sid in sids:
            rec_fields = txn.hash(span_key(sid))
            ev = self._event(txn, sid) if "out" in rec_fields else None
            if ev is not None:
                ready.append((sid, ev, rec_fields))
        if txn.batched:
            txn.load(hashes=[proc_prefix(ev.node, ev.pid) + ":proc" for _, ev, _ in ready])
        return [_span(sid, ev, rec_fields["dec"], rec_fields["tr"],
                      process_resource(ev, txn.hash(proc_prefix(ev.node, ev.pid) + ":proc")))
                for sid, ev, rec_fields in ready]

    def acknowledge(self, sids: Iterable[str]) -> None:
        """These emitted spans were exported (the sink flushed): drop them from OUTBOX."""
        done = tuple(sids)
        if done:
            txn = open_txn(self.store)
            txn.srem(OUTBOX, done)
            txn.commit()


def _index_server(txn: Txn, node: str, pid: int, goid: int, tid: int, start: int, end: int,
                  sid: str) -> None:
    """A server request in its thread's (or goroutine's) lane, where calls look for their parent."""
    lane = f"g{goid}" if goid else f"t{tid}"
    txn.zadd(f"{proc_prefix(node, pid)}:{lane}", start // 1000, f"{start}|{end}|{sid}")


def _index_client(txn: Txn, canon: str, has_seq: bool, seq: int, fingerprint: str, start: int,
                  end: int, sid: str) -> None:
    """A client request under its TCP seq and its connection, where servers look for theirs."""
    if has_seq:
        txn.sadd(seq_key(seq), (f"{start}|{end}|{sid}|{canon}|{fingerprint}",))
    txn.zadd(tuple_key(canon), start // 1000, f"{start}|{end}|{sid}|{int(has_seq)}")


def invalid_http(h: pb.HttpRequest) -> str:
    """Why this HTTP event cannot become a span ("" when it can). The engine skips (and counts)
    such events; `weft stitch` also sends each to the dead-letter topic with this reason."""
    return invalid_reason(h.role, h.start_ns, h.end_ns)


def invalid_reason(role: int, start_ns: int, end_ns: int) -> str:
    """`invalid_http` on the fields it judges (the engine has them decoded)."""
    if role not in (ROLE_SERVER, ROLE_CLIENT):
        return "invalid event: HTTP request without a role (neither accepted nor connected socket)"
    if end_ns < start_ns:
        return f"invalid event: HTTP request ends before it starts ({end_ns} < {start_ns})"
    return ""


def _runtime(proc: Mapping[str, str], known_by_ns: int) -> str:
    """"go" when any ProcessInfo record of the process with ts <= `known_by_ns` says so, else "".
    Only records up to the decision time count: by then every one of them is in the store,
    whatever the interleaving, so the answer does not depend on arrival order. Any record, not
    only the one current at the request: "go" is sticky, because the safe error is a missed
    link (a pid that exec'd from Go into something else), never a wrong one (a later, partial
    record hiding an earlier "go"). No record by then: "" (thread rules)."""
    bound = ""     # n20(known_by_ns), formatted only when a record says "go" (few do)
    for ts, value in proc.items():
        if value.endswith(_GO_TAIL) and value.count(SEP) >= 2:
            bound = bound or n20(known_by_ns)
            if ts <= bound:
                return "go"
    return ""


_GO_TAIL = SEP + "go"   # a record whose last field (the runtime, given 2+ separators) is "go"


def _overlapping(intervals: list[tuple[int, int]]) -> bool:
    """Whether any two of these (start, end) intervals, sorted by start, overlap."""
    reach = -1
    for start, end in intervals:
        if start < reach:
            return True
        reach = max(reach, end)
    return False


def _remote_mark(traceparent: str) -> str:
    sampled = traceparent_sampled(traceparent)
    return "" if sampled is None else "r1" if sampled else "r0"


def _span(sid: str, ev: Http, dec: str, tr: str, resource: Resource) -> Span:
    """The span of a decided, traced request, from its record's `dec` and `tr` fields."""
    parent, link, _ext, flag = dec.split("|")
    trace, _, _, mark = tr.split("|")
    return http_span(sid, ev, trace, parent, link, flag, mark if mark in _DETACHED else "",
                     _REMOTE_MARKS.get(mark), resource)
