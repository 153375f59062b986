"""The agent's loop: probes declare, the runner acts.

Start: check the machine can run us (root, BTF, BCC), compile each probe with BCC into its own
`BPF` object, attach, configure its filter maps, map each ring buffer (read in batches, see
probe_agent.ringbuf; BCC's per-record callback where mapping is not possible).
Loop (every `poll_interval_ms`): sample the kernel clock, drain every ring buffer, decode the
records (a bad record is counted, never raised into the loop), put a ProcessInfo in front of the
first event of each process, hand events to the framer and frames to the sink; now and then read
the probes' kernel counters (ring-buffer losses, full maps), map fill, and re-sample the clock.
Records of passthrough rings (HTTP, connections, goroutine spawns: one or more per traced
request) are not decoded: a span of the ring is copied as it is into a RawRecords event (schema
v2, expanded by schemas.codec), and only each record's header is read here (kind for the
counters, pid for the process announcements and filters, times for the frame's range).
Stop (SIGTERM/SIGINT): detach every program, drain the rings once more, close the last frame with
a final watermark, flush the sink, release every BPF object.
"""

from __future__ import annotations

import array
import ctypes
import gc
import importlib
import logging
import os
import re
import signal
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from probe_agent.btf import release_parsed
from probe_agent.clock import KtimeClock, ktime_now_ns
from probe_agent.config import AgentSettings
from probe_agent.enrich import CgroupScope, ProcessInfoCache
from probe_agent.framer import Framer
from probe_agent.metrics import AgentMetrics
from probe_agent.probes.base import Probe, ProbeContext, RingSpec, read_stats
from probe_agent.ringbuf import MappedRing, framed_size, usable
from probe_agent.sinks import FrameSink
from schemas import records
from schemas import weft_events_pb2 as pb
from schemas.codec import REQUEST_KINDS
from weft.sampling import TraceSampler

logger = logging.getLogger(__name__)

# Probes the agent loads, in order: lineage first so a process's spawn precedes its traffic;
# goroutines after http, whose public maps it uses.
PROBE_CLASSES = (("probe_agent.probes.lineage", "LineageProbe"),
                 ("probe_agent.probes.http", "HttpProbe"),
                 ("probe_agent.probes.goroutines", "GoroutineProbe"))

_HASH_MAP = re.compile(r'BPF_(?:HASH|LRU_HASH|PERCPU_HASH|LRU_PERCPU_HASH)\(\s*(\w+)'
                       r'|BPF_F?_?TABLE\(\s*"(?:lru_)?(?:percpu_)?hash"\s*,[^,]+,[^,]+,\s*(\w+)')


# What the runner reads of a passthrough record: (its ring framing) length, then header ts_ns
# (its event time: an HTTP record's is the request's start), pid, kind, version; see
# schemas/records.py.
_RAW_HEAD = struct.Struct("<I4xQ8xI4xHH")
_TS_AT, _PID_AT, _KIND_AT, _VERSION_AT = 8, 24, 32, 34  # the same fields' offsets, framing included
_RAW_SIZE_MASK = records.DISCARDED - 1
_RAW_BAD = 1 << 62  # sentinel "record size" of kinds a ring does not carry
# Raw spans are large (up to a whole ring after a burst) and are copied a few times on their
# way out; glibc keeps such freed blocks in its heap. Hand them back after this many bytes.
_TRIM_AFTER_BYTES = 8 << 20
_LATE_ROUND_S = 0.25   # a round starting this late is logged and counted (late_rounds)


@dataclass
class _RawSpan:
    """Records copied from a passthrough ring, with the clock offset at the time."""

    blob: bytes
    offset_ns: int
    probe: str
    sizes: dict[int, int]  # kind -> minimum record size, for the kinds this ring carries
    record_size: int = 0   # every record has this size (RingSpec.record_size), 0: sizes vary


@dataclass
class _Batch:
    """Events ready for the framer: each with its time range and how many records it holds."""

    events: list[pb.Event] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    t_max: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)

    def add(self, event: pb.Event, ts: int) -> None:
        self.events.append(event)
        self.times.append(ts)
        self.t_max.append(ts)
        self.weights.append(1)


class AgentStartError(RuntimeError):
    """The agent cannot run here; the message is one sentence a person can act on."""


def default_probes() -> list[Probe]:
    probes: list[Probe] = []
    for module_name, class_name in PROBE_CLASSES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            logger.warning("probe module %s is not present: running without it", module_name)
            continue
        probes.append(getattr(module, class_name)())
    return probes


def preflight(inject_headers: bool = False) -> str:
    """Raise AgentStartError when this machine cannot run the agent; else the start-up line."""
    if os.geteuid() != 0:  # before anything loads: probing the kernel needs root too
        raise AgentStartError("weft agent needs root (CAP_BPF, CAP_PERFMON): run it as root")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise AgentStartError("weft agent needs kernel BTF (/sys/kernel/btf/vmlinux is missing): "
                              "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    from probe_agent.kernel import probe_kernel

    features = probe_kernel()
    problems = features.blocking_problems()
    if problems:
        raise AgentStartError(f"weft agent cannot run here: {problems[0]}")
    if inject_headers and features.header_injection != "sk_msg":
        raise AgentStartError(f"weft agent --inject-headers: {features.injection_sentences()[0]}")
    line = features.one_line()
    if inject_headers:
        return line + "; header injection: " + " ".join(features.injection_sentences())
    return line + "; header injection off (--inject-headers turns it on)"


@dataclass
class _Loaded:
    probe: Probe
    bpf: Any  # bcc.BPF
    hash_maps: tuple[str, ...]
    mapped: list[tuple[RingSpec, MappedRing]] = field(default_factory=list)  # read by us
    bcc_rings: int = 0  # rings read through BCC's per-record callback
    # stats_map indexes of the probe's `blind_stats` (records lost with no marker), read each round
    blind_indexes: tuple[ctypes.c_int, ...] = ()


class AgentRunner:
    def __init__(self, settings: AgentSettings, sink: FrameSink, metrics: AgentMetrics, *,
                 probes: Sequence[Probe] | None = None, cgroups: tuple[CgroupScope, ...] = (),
                 clock: KtimeClock | None = None, sampler: TraceSampler | None = None) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.probes = list(default_probes() if probes is None else probes)
        extra: dict[str, int] = {}
        if settings.inject_headers:
            # WEFT-INJECT: the injector owns the context maps the other probes use: load it first
            from probe_agent.probes.inject import INJECT_FLAG, InjectProbe

            if not any(p.name == "inject" for p in self.probes):
                self.probes.insert(0, InjectProbe(settings.cgroups, sampler))
            extra[INJECT_FLAG] = 1
        self.clock = clock or KtimeClock(settings.clock_refresh_s)
        # Aim a few poll rounds early so that loop jitter keeps watermarks within the interval.
        wm_target = max(settings.poll_interval_ms,
                        settings.watermark_interval_ms - 3 * settings.poll_interval_ms)
        self.framer = Framer(settings.node, max_events=settings.frame_max_events,
                             max_delay_ms=settings.frame_max_delay_ms,
                             watermark_interval_ms=wm_target)
        self.processes = ProcessInfoCache(settings.process_cache_size)
        self.ctx = ProbeContext(self_pid=os.getpid(), cgroups=cgroups,
                                ktime_offset_ns=self.clock.offset_ns, ring_pages=settings.ring_pages,
                                extra=extra)
        self._loaded: list[_Loaded] = []
        self._incoming: list[pb.Event | _RawSpan] = []
        self._announced: OrderedDict[int, None] = OrderedDict()
        self._pid_filter: set[int] | None = set(settings.pids) if settings.pids else None
        self._first_pids = frozenset(settings.pids)
        self.last_round_at = time.monotonic()   # when a poll round last ended (/healthz reads it)
        self._stop = False
        self.failure = ""                 # why the run ended early (the sink failed), else empty
        self._round_left = settings.round_budget
        self._drained_at = ktime_now_ns()
        self._last_decode_log = 0.0
        self._raw_limit = max(1, settings.frame_max_events - 1)  # records per RawRecords event
        self._raw_bytes = 0  # passthrough bytes read since the heap was last trimmed
        self._libc: Any = None
        self.lost_records = 0
        self._blind_seen: dict[tuple[str, int], int] = {}  # (probe, stat index) -> total, last round
        self._blind_since = self._drained_at                # when they were last read

    # -- start -----------------------------------------------------------------------------

    def load(self) -> None:
        """Compile, attach, configure and open every probe; AgentStartError when one fails."""
        from bcc import BPF  # imported here: `weft --help` must not need BCC

        try:
            for probe in self.probes:
                cflags = probe.cflags(self.ctx)
                try:
                    bpf = BPF(src_file=str(probe.source).encode(), cflags=cflags)
                except Exception as exc:
                    raise AgentStartError(
                        f"weft agent cannot compile or load {probe.source.name} with BCC ({exc}); "
                        "`weft doctor` says what this kernel allows") from None
                loaded = _Loaded(probe, bpf, _hash_maps(probe.source), blind_indexes=tuple(
                    ctypes.c_int(probe.stat_names.index(name)) for name in getattr(probe, "blind_stats", ())))
                self._loaded.append(loaded)
                try:
                    probe.attach(bpf, self.ctx)
                    probe.configure(bpf, self.ctx)
                    for ring in probe.rings:
                        self._open_ring(loaded, ring)
                except Exception as exc:
                    raise AgentStartError(
                        f"weft agent cannot attach probe {probe.name} ({exc}); "
                        "`weft doctor` says what this kernel allows") from None
                logger.info("probe %s loaded from %s", probe.name, probe.source)
        except BaseException:
            self._release()
            raise
        shed_compiler_memory()

    def _open_ring(self, loaded: _Loaded, ring: RingSpec) -> None:
        """Map the ring and read it in batches (see probe_agent.ringbuf); BCC's per-record
        callback where that is not possible or not wanted."""
        table = loaded.bpf[ring.map_name.encode()]
        if self.settings.ring_reader == "mmap" and usable():
            try:
                loaded.mapped.append((ring, MappedRing(table.map_fd, int(table.max_entries))))
                return
            except (OSError, ValueError) as exc:
                logger.warning("cannot map ring %s (%s): reading it through BCC", ring.map_name, exc)
        table.open_ring_buffer(self._ring_callback(loaded.probe.name, ring))
        loaded.bcc_rings += 1

    def _read_mapped(self, probe: str, ring: RingSpec, mapped: MappedRing, budget: int) -> bool:
        """Decode one batch of a mapped ring into the incoming list (or, for a passthrough
        ring, copy it there as it is); True if it was emptied."""
        if ring.passthrough and self.settings.record_envelope:
            if ring.record_size:
                span, _n, drained = mapped.read_stride(budget, ring.record_size)
            else:
                span, _n, drained = mapped.read_span(budget)
            if span:
                self._raw_bytes += len(span)
                sizes = {k: records.RECORD_SIZES[k] for k in ring.passthrough}
                self._incoming.append(_RawSpan(span, self.clock.offset_ns, probe, sizes,
                                               ring.record_size))
            return drained
        batch, drained = mapped.read(budget)
        decode, offset_ns, incoming = ring.decode, self.clock.offset_ns, self._incoming
        for raw in batch:
            try:
                incoming.extend(decode(raw, offset_ns))
            except Exception as exc:  # never into the poll loop
                self._decode_failed(probe, ring.map_name, len(raw), exc)
        return drained

    def _decode_failed(self, probe: str, ring: str, size: int, exc: Exception) -> None:
        self.metrics.decode_errors.inc()
        now = time.monotonic()
        if now - self._last_decode_log > 10:
            self._last_decode_log = now
            logger.warning("probe %s: a %d-byte record from %s did not decode: %s",
                           probe, size, ring or "its ring", exc)

    def _ring_callback(self, probe: str, ring: RingSpec) -> Callable[[Any, Any, int], int]:
        decode, incoming, clock = ring.decode, self._incoming, self.clock

        def on_record(_ctx: Any, data: Any, size: int) -> int:
            try:
                incoming.extend(decode(ctypes.string_at(data, size), clock.offset_ns))
            except Exception as exc:  # never into the poll loop
                self._decode_failed(probe, ring.map_name, size, exc)
            # A negative return makes libbpf stop after this record (which counts as consumed):
            # one round never runs unbounded while the kernel keeps producing.
            self._round_left -= 1
            return 0 if self._round_left > 0 else -1

        return on_record

    # -- loop ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            self._stop = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def request_stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        """Poll until stopped, then shut down cleanly (see close())."""
        try:
            self._loop(self.settings.poll_interval_ms / 1000)
        finally:
            self.close()
        self.failure = self.sink.failure

    def _loop(self, interval: float) -> None:
        """Rounds every `interval` seconds until request_stop(), or until the sink can take no
        more frames (then the agent stops, detaches and says why)."""
        next_stats = next_fill = 0.0
        due = time.monotonic()
        while not self._stop and not self.sink.failure:
            started, cpu_started = time.monotonic(), time.thread_time()
            # A round that starts long after its time means the agent was not scheduled (a
            # starved CPU): the kernel kept filling the rings meanwhile, so say so, as the
            # likely cause of any loss the next counter read reports.
            if started - due > _LATE_ROUND_S:
                self._not_scheduled(started - due)
            self.step()
            if started >= next_stats:
                self.read_kernel_counters()
                next_stats = started + 1.0
            if started >= next_fill:
                self.read_map_fill()
                next_fill = started + self.settings.map_fill_interval_s
            took = time.monotonic() - started
            off_cpu = took - (time.thread_time() - cpu_started)
            if off_cpu > _LATE_ROUND_S:     # the same, in the middle of a round
                self._not_scheduled(off_cpu)
            elif took > 2 * interval:
                logger.info("slow round: %.0f ms", took * 1000)
            self.last_round_at = started + took
            time.sleep(max(0.0, interval - took))
            due = started + max(interval, took)

    def liveness(self) -> tuple[bool, str]:
        """/healthz: the poll loop turns (else the rings fill and records are lost)."""
        since = time.monotonic() - self.last_round_at
        if since > self.settings.health_stall_s:
            return False, f"no poll round has ended for {since:.0f} s"
        return True, f"last poll round ended {since * 1000:.0f} ms ago"

    def _not_scheduled(self, seconds: float) -> None:
        self.metrics.late_rounds.inc()
        logger.warning("agent was not scheduled for %.0f ms (CPU starved); ring buffers fill "
                       "meanwhile", seconds * 1000)

    def step(self) -> None:
        """One round: drain the rings, frame what came, send what is ready.

        The watermark is the time sampled before the last round that emptied every ring: when a
        round stops at its budget (the kernel produces faster than we decode), records emitted
        before `now` may still wait in a ring, so the watermark holds still until we catch up."""
        now = ktime_now_ns()
        if self._consume():
            self._drained_at = now
        self._watch_blind()
        frames: list[pb.Frame] = []
        if self._incoming:
            frames += self._frame(self._prepare(self._take_incoming()), now)
        frames += self.framer.tick(now, self.clock.to_unix_ns(self._drained_at))
        for frame in frames:
            self.sink.send(frame)
        self.sink.poll()
        self.clock.refresh_if_due(now)
        if self._raw_bytes >= _TRIM_AFTER_BYTES:
            self._trim_heap()

    def _trim_heap(self) -> None:
        """Return the heap that raw spans and their frames left free (RSS stays flat)."""
        self._raw_bytes = 0
        try:
            if self._libc is None:
                self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
        except (OSError, AttributeError) as exc:
            logger.debug("malloc_trim: %s", exc)

    def _consume(self) -> bool:
        """Read every ring, at most `round_budget` records from each; True if all were emptied."""
        drained = True
        budget = self.settings.round_budget
        for loaded in self._loaded:
            # WEFT-INJECT: the injector has maps and programs, no ring
            for ring, mapped in loaded.mapped:
                drained = self._read_mapped(loaded.probe.name, ring, mapped, budget) and drained
            if loaded.bcc_rings:
                self._round_left = budget
                loaded.bpf.ring_buffer_consume()
                drained = drained and self._round_left > 0
        return drained

    def _watch_blind(self) -> None:
        """Read, every round, the counters of records the kernel lost without leaving even a
        marker (`Probe.blind_stats`); when they grew, publish the span of time since the last
        read as a BlindSpan. It starts after the newest watermark already sent (taken before
        that read), so the stitcher always has it before deciding anything it covers."""
        at = ktime_now_ns()
        lost = 0
        for loaded in self._loaded:
            for index in loaded.blind_indexes:
                try:
                    total = int(loaded.bpf[loaded.probe.stats_map.encode()].sum(index).value)
                except Exception as exc:  # never into the poll loop
                    logger.debug("probe %s: cannot read its counters: %s", loaded.probe.name, exc)
                    continue
                lost += total - self._blind_seen.get((loaded.probe.name, index.value), 0)
                self._blind_seen[(loaded.probe.name, index.value)] = total
        since, self._blind_since = self._blind_since, at
        if lost <= 0:
            return
        event = pb.Event()
        event.blind.ts_ns = self.clock.to_unix_ns(since)
        event.blind.until_ns = self.clock.to_unix_ns(at)
        event.blind.records = lost
        self._incoming.append(event)
        logger.warning("%d records lost in the kernel without a trace in the last %.0f ms: the "
                       "stitcher links no call made then inside its process", lost, (at - since) / 1e6)

    def _take_incoming(self) -> list[pb.Event | _RawSpan]:
        events = list(self._incoming)
        self._incoming.clear()  # the callbacks hold this list object: keep it
        return events

    def _frame(self, batch: _Batch, now: int) -> list[pb.Frame]:
        return self.framer.add(batch.events, now, batch.times, t_max=batch.t_max,
                               weights=batch.weights)

    def _prepare(self, items: Sequence[pb.Event | _RawSpan]) -> _Batch:
        """Count, filter, and put ProcessInfo before the first event of each process."""
        batch = _Batch()
        counts: dict[str, int] = {}
        raw_counts: dict[int, int] = {}
        self_pid, pid_filter, announced = self.ctx.self_pid, self._pid_filter, self._announced
        for event in items:
            if isinstance(event, _RawSpan):
                if not (event.record_size and self._prepare_fixed(event, batch, raw_counts)):
                    self._prepare_raw(event, batch, raw_counts)
                continue
            kind = event.WhichOneof("kind")
            if kind is None:
                continue
            counts[kind] = counts.get(kind, 0) + 1
            body = getattr(event, kind)
            if kind == "blind":   # the node's, not a process's
                batch.add(event, body.ts_ns)
                continue
            if kind == "process":
                self._on_exec(event, batch)
                continue
            ts = body.start_ns if kind in REQUEST_KINDS else body.ts_ns
            pid = body.parent_pid if kind == "thread_spawn" else body.pid
            if pid == self_pid:
                continue  # belt and braces: the kernel side already skips the agent
            if pid_filter is not None:
                if pid not in pid_filter:
                    continue
                if kind == "thread_spawn" and body.new_process:
                    pid_filter.add(body.child_pid)  # children of a traced process are traced
            if pid not in announced:
                self._announce(pid, ts, batch)
            batch.add(event, ts)
            if kind == "task_exit" and body.tid == body.pid:
                self._forget(pid)
        for name, n in counts.items():
            self.metrics.count_event(name, n)
        for record_kind, n in raw_counts.items():
            self.metrics.count_event(records.EVENT_KIND_OF.get(record_kind, ""), n)
        return batch

    def _prepare_fixed(self, span: _RawSpan, batch: _Batch, counts: dict[int, int]) -> bool:
        """`_prepare_raw` for a span of same-size records (the HTTP ring), with their headers
        read as arrays: one C-level pass per field instead of a Python step per record. The
        ProcessInfo of each process first seen in a RawRecords event goes just before that
        event. False (nothing done) where the per-record path is needed: a record of another
        kind or ABI version, or records to leave out (the agent's own, `--pid` filtering)."""
        blob, offset_ns = span.blob, span.offset_ns
        stride = framed_size(span.record_size)
        words, halves = stride // 8, stride // 2
        n = len(blob) // stride
        halfwords = array.array("H", blob)
        kinds = halfwords[_KIND_AT // 2 :: halves]
        kind = kinds[0] if n else 0
        if (not n or kinds.count(kind) != n or span.sizes.get(kind) != span.record_size or
                halfwords[_VERSION_AT // 2 :: halves].count(records.ABI_VERSION) != n):
            return False
        pids = array.array("I", blob)[_PID_AT // 4 :: stride // 4]
        if self._pid_filter is not None or self.ctx.self_pid in pids:
            return False
        times = array.array("Q", blob)[_TS_AT // 8 :: words]
        counts[kind] = counts.get(kind, 0) + n
        limit, announced, compress = self._raw_limit, self._announced, self.settings.compress_records
        for first in range(0, n, limit):
            last = min(n, first + limit)
            chunk_pids = pids[first:last]
            for pid in sorted(set(chunk_pids) - announced.keys(), key=chunk_pids.index):
                self._announce(pid, times[first + chunk_pids.index(pid)] + offset_ns, batch)
            chunk_times = times[first:last]
            event = pb.Event()
            raw = event.raw
            raw.abi_version, raw.ktime_offset_ns, raw.count = records.ABI_VERSION, offset_ns, last - first
            if compress:
                records.compress_records(raw, blob[first * stride : last * stride])
            else:
                raw.records = blob[first * stride : last * stride]
            batch.events.append(event)
            batch.times.append(min(chunk_times) + offset_ns)
            batch.t_max.append(max(chunk_times) + offset_ns)
            batch.weights.append(last - first)
        return True

    def _prepare_raw(self, span: _RawSpan, batch: _Batch, counts: dict[int, int]) -> None:
        """Cut a span of passthrough records into RawRecords events, reading each record's
        header only: records of the agent itself, of processes not traced (`--pids`) or that
        cannot be valid are left out, and a ProcessInfo goes before the first record of each
        process, exactly as on the decoding path."""
        blob, offset_ns, sizes = span.blob, span.offset_ns, span.sizes
        self_pid, pid_filter, announced = self.ctx.self_pid, self._pid_filter, self._announced
        limit, end = self._raw_limit, len(blob)
        compress = self.settings.compress_records
        unpack, abi = _RAW_HEAD.unpack_from, records.ABI_VERSION
        pos = seg = n = 0
        lo, hi = 1 << 64, 0

        def cut(upto: int) -> None:
            if n:
                event = pb.Event()
                raw = event.raw
                raw.abi_version, raw.ktime_offset_ns, raw.count = abi, offset_ns, n
                if compress:
                    records.compress_records(raw, blob[seg:upto])
                else:
                    raw.records = blob[seg:upto]
                batch.events.append(event)
                batch.times.append(lo + offset_ns)
                batch.t_max.append(hi + offset_ns)
                batch.weights.append(n)

        while pos < end:
            if pos + _RAW_HEAD.size > end:  # a record shorter than a header ends the span
                self._decode_failed(span.probe, "", end - pos, ValueError("truncated record"))
                end = pos
                break
            length, ts, pid, kind, version = unpack(blob, pos)
            size = length & _RAW_SIZE_MASK
            nxt = pos + ((size + 15) & ~7)
            if (length & records.DISCARDED or version != abi or size < sizes.get(kind, _RAW_BAD)
                    or nxt > end):
                if not length & records.DISCARDED:
                    self._decode_failed(span.probe, "", size, ValueError(
                        f"record of kind {kind}, ABI version {version}, {size} bytes"))
                cut(pos)
                pos = seg = nxt
                n, lo, hi = 0, 1 << 64, 0
                continue
            counts[kind] = counts.get(kind, 0) + 1
            if pid == self_pid or (pid_filter is not None and pid not in pid_filter):
                cut(pos)
                pos = seg = nxt
                n, lo, hi = 0, 1 << 64, 0
                continue
            if pid not in announced:
                cut(pos)
                seg, n, lo, hi = pos, 0, 1 << 64, 0
                self._announce(pid, ts + offset_ns, batch)
            n += 1
            if ts < lo:
                lo = ts
            if ts > hi:
                hi = ts
            pos = nxt
            if n >= limit:
                cut(pos)
                seg, n, lo, hi = pos, 0, 1 << 64, 0
        cut(pos)

    def _announce(self, pid: int, ts_ns: int, batch: _Batch) -> None:
        self._announced[pid] = None
        if len(self._announced) > self.settings.process_cache_size:
            self._announced.popitem(last=False)
        info = self.processes.get(pid)
        if info is not None:
            self._tell_probes(info)
            fresh = pb.ProcessInfo()
            fresh.CopyFrom(info)
            fresh.ts_ns = ts_ns
            batch.add(pb.Event(process=fresh), ts_ns)

    def _on_exec(self, event: pb.Event, batch: _Batch) -> None:
        """The kernel saw an exec: re-read the process and announce it again, merged."""
        kernel_info = event.process
        pid = kernel_info.pid
        if pid == self.ctx.self_pid or (self._pid_filter is not None and pid not in self._pid_filter):
            return
        self._probes_forget(pid)  # a new program image: what was known of the old one is void
        self.processes.forget(pid)
        self._announced[pid] = None
        proc = self.processes.get(pid)
        if proc is not None:
            self._tell_probes(proc)
            merged = pb.ProcessInfo()
            merged.CopyFrom(proc)
            merged.ts_ns = kernel_info.ts_ns
            if kernel_info.start_ns:
                merged.start_ns = kernel_info.start_ns
            if kernel_info.cgroup_id:
                merged.cgroup_id = kernel_info.cgroup_id
            batch.add(pb.Event(process=merged), kernel_info.ts_ns)
        else:
            batch.add(event, kernel_info.ts_ns)  # gone already: the kernel's is all there is

    def _tell_probes(self, info: pb.ProcessInfo) -> None:
        """Probes that act per process (the goroutine probe: uprobes on Go executables) learn
        of each process announced, and of each exit."""
        for loaded in self._loaded:
            hook = getattr(loaded.probe, "on_process", None)
            if hook is not None:
                try:
                    hook(info)
                except Exception as exc:  # never into the poll loop
                    logger.warning("probe %s: process %d: %s", loaded.probe.name, info.pid, exc)

    def _probes_forget(self, pid: int) -> None:
        for loaded in self._loaded:
            hook = getattr(loaded.probe, "forget", None)
            if hook is not None:
                hook(pid)

    def _forget(self, pid: int) -> None:
        self._probes_forget(pid)
        self.processes.forget(pid)
        self._announced.pop(pid, None)
        if self._pid_filter is not None and pid not in self._first_pids:
            self._pid_filter.discard(pid)

    # -- counters --------------------------------------------------------------------------

    def read_kernel_counters(self) -> None:
        for loaded in self._loaded:
            try:
                totals = read_stats(loaded.bpf, loaded.probe)
            except Exception as exc:
                logger.debug("probe %s: cannot read %s: %s", loaded.probe.name,
                             loaded.probe.stats_map, exc)
                continue
            lost = self.metrics.kernel_counters(loaded.probe.name, totals)
            if lost:
                # (an HTTP record lost leaves a LostRequest marker; records lost without one
                # are published as BlindSpans, see _watch_blind)
                self.lost_records += lost
                logger.warning("probe %s: the kernel lost %d records (ring buffer full)",
                               loaded.probe.name, lost)
        self.metrics.process_cache.set(len(self.processes))

    def _log_kernel_counters(self) -> None:
        """At exit, one line per probe with its non-zero kernel counters (drops and their causes)."""
        for loaded in self._loaded:
            try:
                totals = read_stats(loaded.bpf, loaded.probe)
            except Exception as exc:
                logger.debug("probe %s: cannot read counters: %s", loaded.probe.name, exc)
                continue
            shown = ", ".join(f"{name} {n}" for name, n in totals.items() if n)
            if shown:
                logger.info("probe %s kernel counters: %s", loaded.probe.name, shown)

    def read_map_fill(self) -> None:
        for loaded in self._loaded:
            for name in loaded.hash_maps:
                try:
                    table = loaded.bpf.get_table(name.encode())
                    self.metrics.map_fill(loaded.probe.name, name, len(table) / table.max_entries)
                except Exception as exc:
                    logger.debug("map %s of %s: %s", name, loaded.probe.name, exc)

    # -- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        """Detach everything, publish what the rings still hold, flush, release."""
        if not self._loaded and self.framer.pending == 0:
            self.sink.close()
            return
        # Each tracepoint detach waits for an RCU grace period (~80 ms here, seconds in all):
        # detach in a thread while this one keeps the loop (and the watermark cadence) going.
        detacher = threading.Thread(target=self._detach_all, name="weft-detach")
        detacher.start()
        while detacher.is_alive():
            self.step()
            detacher.join(self.settings.poll_interval_ms / 1000)
        # Nothing new is emitted now: read the rings empty (for a bounded time) and close with
        # a final watermark that covers everything read.
        frames: list[pb.Frame] = []
        now = ktime_now_ns()
        deadline = time.monotonic() + 5.0
        while True:
            drained = self._consume()
            self._watch_blind()
            frames += self._frame(self._prepare(self._take_incoming()), now)
            if drained:
                self._drained_at = now
                break
            if time.monotonic() > deadline:
                logger.warning("stopping with records still unread in the ring buffers")
                break
        self.read_kernel_counters()
        self._log_kernel_counters()
        frames += self.framer.flush(now, self.clock.to_unix_ns(self._drained_at))
        for frame in frames:
            self.sink.send(frame)
        self.sink.close()
        self._release()

    def _detach_all(self) -> None:
        for loaded in self._loaded:
            try:
                loaded.probe.detach(loaded.bpf)
            except Exception as exc:
                logger.warning("probe %s: detach failed: %s", loaded.probe.name, exc)
            _detach_tracepoints(loaded.bpf)

    def _release(self) -> None:
        while self._loaded:
            loaded = self._loaded.pop()
            for _ring, mapped in loaded.mapped:
                mapped.close()
            try:
                loaded.bpf.cleanup()
            except Exception as exc:
                logger.warning("probe %s: BCC cleanup failed: %s", loaded.probe.name, exc)


_MADV_DONTNEED = 4
_COMPILER_LIBS = ("libLLVM", "libclang")


def shed_compiler_memory() -> None:
    """Give back what compiling cost (~100 MB here): BCC's clang/LLVM leave freed heap that glibc
    keeps, and tens of MB of their code pages mapped in this process although no further compile
    happens. malloc_trim returns the heap. For the code, MADV_DONTNEED on a read-only file mapping
    that holds no private (copied-on-write) page only unmaps page-cache pages: their content is
    the file's, so a later access faults the same bytes back in. Mappings that hold any private
    page are left alone. Best effort: a failure only costs memory."""
    release_parsed()  # the BTF offsets are compiled in: the parsed kernel types are garbage now
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for start, end in _clean_compiler_mappings(Path("/proc/self/smaps").read_text()):
            libc.madvise(start, end - start, _MADV_DONTNEED)
    except (OSError, AttributeError, ValueError) as exc:
        logger.debug("could not shed compiler memory: %s", exc)


def _clean_compiler_mappings(smaps: str) -> list[tuple[int, int]]:
    """(start, end) of the compiler libraries' read-only file mappings with no private page."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps.splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            current = None
            if len(parts) >= 6 and "w" not in parts[1] and any(lib in parts[5] for lib in _COMPILER_LIBS):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                current = (lo, hi)
        elif current is not None and parts[:1] == ["Anonymous:"]:
            if int(parts[1]) == 0:
                out.append(current)
            current = None
    return out


def _detach_tracepoints(bpf: Any) -> None:
    """Stop new records before the last drain (bpf.cleanup() would also do it, after)."""
    for tp in list(getattr(bpf, "tracepoint_fds", {})):
        try:
            bpf.detach_tracepoint(tp)
        except Exception as exc:
            logger.debug("detach tracepoint %s: %s", tp, exc)
    for tp in list(getattr(bpf, "raw_tracepoint_fds", {})):
        try:
            bpf.detach_raw_tracepoint(tp)
        except Exception as exc:
            logger.debug("detach raw tracepoint %s: %s", tp, exc)


def _hash_maps(source: Path) -> tuple[str, ...]:
    """Names of the hash maps a program declares (their fill is worth watching)."""
    try:
        text = source.read_text()
    except OSError:
        return ()
    return tuple(sorted({a or b for a, b in _HASH_MAP.findall(text)}))


def _injected_flags(sampler: TraceSampler) -> str:
    """What the start-up line says about the sampled flag of injected traceparents."""
    if sampler.parent_based:
        own = "" if sampler.keeps_every_root else (
            f", sampled for {sampler.ratio:g} of the traces that start here")
        return f"injected traceparents pass on the caller's sampled flag ({sampler.name}){own}"
    return f"injected traceparents say sampled for {sampler.name} {sampler.ratio:g} of traces"


def run_agent(*, node: str | None = None, cgroups: Sequence[str] | None = None,
              pids: Sequence[int] | None = None, bootstrap: str | None = None,
              capture: str | None = None, metrics_port: int | None = None,
              config_file: str | None = None, inject_headers: bool | None = None) -> int:
    """`weft agent`: settings → checks → probes → loop. Returns the exit status."""
    from confluent_kafka import KafkaException

    from probe_agent.enrich import cgroup_scope
    from probe_agent.sinks import CaptureSink, KafkaSink
    from probe_agent.spool import Spool
    from weft.config import ConfigError, KafkaSettings, load_section

    if bootstrap and capture:
        print("weft agent: give --kafka or --capture, not both", flush=True)
        return 2
    try:
        settings = load_section(AgentSettings, "agent", config_file=config_file, node=node,
                                cgroups=tuple(cgroups) if cgroups else None,
                                pids=tuple(pids) if pids else None, capture=capture,
                                metrics_port=metrics_port, inject_headers=inject_headers)
        kafka = load_section(KafkaSettings, "kafka", config_file=config_file, bootstrap=bootstrap)
        # the sampled flag of the traceparents it injects (read only then: nothing else uses it)
        sampler = TraceSampler.from_env() if settings.inject_headers else TraceSampler()
    except ConfigError as exc:
        print(f"weft agent: {exc}", flush=True)
        return 2
    try:
        kernel_line = preflight(settings.inject_headers)
        scopes = tuple(cgroup_scope(p) for p in settings.cgroups)
    except AgentStartError as exc:
        print(str(exc), flush=True)
        return 1
    except OSError as exc:
        print(f"weft agent: cgroup {exc.filename} does not exist: give a cgroup v2 path", flush=True)
        return 2
    metrics = AgentMetrics(settings.node)
    if settings.capture:
        try:
            sink: FrameSink = CaptureSink(settings.capture, settings.node, metrics)
        except OSError as exc:
            print(f"weft agent: cannot write capture file {settings.capture}: {exc.strerror or exc}",
                  flush=True)
            return 2
        where = f"capture {settings.capture}"
    else:
        spool = Spool(settings.spool_path(), max_bytes=settings.spool_max_bytes,
                      segment_bytes=settings.spool_segment_bytes)
        try:
            sink = KafkaSink(kafka, settings.node, spool, metrics,
                             max_in_flight=settings.max_in_flight_frames,
                             stall_after_ms=settings.stall_after_ms)
        except KafkaException as exc:      # e.g. a CA or key file librdkafka cannot read
            print(f"weft agent: the Kafka client refused the kafka settings: {exc.args[0].str()}", flush=True)
            return 2
        where = f"kafka {kafka.bootstrap} topic {kafka.raw_topic}"
    runner = AgentRunner(settings, sink, metrics, cgroups=scopes, sampler=sampler)
    if settings.inject_headers and not sampler.keeps_all:
        kernel_line += f"; {_injected_flags(sampler)} (OTEL_TRACES_SAMPLER: give the stitchers the same)"
    runner.install_signal_handlers()
    try:
        runner.load()
    except AgentStartError as exc:
        print(str(exc), flush=True)
        return 1
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_addr, live=runner.liveness)
    scope = (f"cgroups {', '.join(settings.cgroups)}" if settings.cgroups else
             f"pids {', '.join(map(str, settings.pids))}" if settings.pids else "every process")
    print(f"weft agent {settings.node}: {kernel_line}; probes "
          f"{', '.join(p.name for p in runner.probes)}; tracing {scope}; frames to {where}",
          flush=True)
    runner.run()
    if runner.failure:
        print(f"weft agent: {runner.failure}", flush=True)
        return 1
    return 0
