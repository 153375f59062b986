"""Kernel records, ABI version 1: their layouts, and their decoding into schema events.

The eBPF programs in bpf/ write fixed-layout records into ring buffers (bpf/common.h is the C
side; tests/unit/test_bpf_abi.py checks both sides agree). This module is the one place that
reads them: the agent decodes the low-volume kinds itself, and forwards the high-volume ones
(HTTP requests, connections, goroutine spawns) untouched inside `RawRecords` events
(schema v2), which `schemas.codec` expands with the same functions. Every layout is pinned per
ABI version by golden vectors (tests/unit/test_codec_raw.py): changing a layout without bumping
WEFT_ABI_VERSION fails that test.

Every record starts with the 32-byte header (ts_ns, cgroup_id, pid, tid, kind, version,
reserved), little-endian, naturally aligned. ts_ns is the record's event time: for an HTTP
record the request's start (= req.start), so a reader orders records by their header alone.

    kind 1 thread spawn   header | child_pid u32 | child_tid u32                         (40 B)
    kind 2 task exit      header                                                         (32 B)
    kind 3 exec           header | start_ns u64 | ppid u32 | filename_len u32 | filename[128]
    kind 4/5 conn open/close  header | cookie u64 | bytes_sent u64 | bytes_recv u64 | tuple (96 B)
    kind 6 HTTP           header | cookie u64 | tuple | req | tpctx                      (512 B)
    kind 7 goroutine spawn    header | parent_goid u64 | child_goid u64                  (48 B)
    kind 8 lost HTTP      header | cookie u64 | end u64 | goid u64 | seq u32 | has_seq u8 | pad[3]
                          | tuple                                                        (104 B)
                          (an HTTP record the HTTP ring had no room for, sent through the
                          connection ring: the request's thread, connection and times only)

    tuple := laddr[16] raddr[16] lport u16 rport u16 family u8 role u8 mid_stream u8 pad
    req   := start u64 end u64 pid u32 tid u32 seq u32 status u16 has_seq u8 flags u8
             method_len path_len host_len tp_len ts_len done_headers no_body (u8 each) pad
             method[8] path[128] host[64] traceparent[56] tracestate[64] goid u64
    tpctx := serial u64 trace_hex[32] span_hex[16] kind u8 open u8 unsampled u8 parent u8 pad[4]

Text fields are valid up to their length and zero after it (the kernel clears a request slot
before reusing it: records leave the node as they are). The kernel cuts the path at '?' or '#'
before copying it, so no record holds a query string; only the Host, traceparent and
tracestate headers are ever copied, never a body.

Envelope (RawRecords.records): each record as `u32 length | u32 reserved | record | pad to a
multiple of 8` — the ring buffer's own framing, so the agent copies spans of the ring as they
are (the reserved word then holds the kernel's page offset, the padding whatever the ring
held; readers ignore both). Bit 30 of length marks a record the kernel discarded: readers
skip it. With `compression = RECORDS_LZ4_BLOCK` these bytes are stored as one raw LZ4 block of
`plain_size` bytes (the agent's default: the mostly zero-filled records shrink ~4x).
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable, Iterator

import cramjam

from schemas import weft_events_pb2 as pb

ABI_VERSION = 1
SUPPORTED_ABI_VERSIONS = frozenset({1})


class Kind(enum.IntEnum):
    THREAD_SPAWN = 1
    TASK_EXIT = 2
    EXEC = 3
    CONN_OPEN = 4
    CONN_CLOSE = 5
    HTTP = 6
    GO_SPAWN = 7
    HTTP_LOST = 8


# The schema event kind (pb.Event oneof name) each record kind decodes to.
EVENT_KIND_OF: dict[int, str] = {
    Kind.THREAD_SPAWN: "thread_spawn", Kind.TASK_EXIT: "task_exit", Kind.EXEC: "process",
    Kind.CONN_OPEN: "conn_open", Kind.CONN_CLOSE: "conn_close", Kind.HTTP: "http",
    Kind.GO_SPAWN: "goroutine_spawn", Kind.HTTP_LOST: "lost_http",
}


class AbiError(ValueError):
    """A record the decoder cannot read (short, unknown kind, or another ABI version)."""


# struct weft_hdr: ts_ns, cgroup_id, pid, tid, kind, version, reserved.
HEADER = struct.Struct("<QQIIHHI")
TUPLE = struct.Struct("<16s16sHHBBBx")
REQ = struct.Struct("<QQIIIHBBBBBBBBBx8s128s64s56s64sQ")
COOKIE = struct.Struct("<Q")
CONN_COUNTS = struct.Struct("<QQQ")  # cookie, bytes_sent, bytes_recv
TPCTX = struct.Struct("<Q32s16sBxB5x")  # header injection ids (bpf/inject.h struct weft_tpctx)
THREAD_SPAWN_BODY = struct.Struct("<II")  # child_pid, child_tid
EXEC_FIXED = struct.Struct("<QII")  # start_ns, ppid, filename_len
FILENAME_MAX = 128
GO_SPAWN_BODY = struct.Struct("<QQ")  # parent_goid, child_goid
LOST_BODY = struct.Struct("<QQQIB3x")  # cookie, end_ns, goid, seq, has_seq


def _joined(*parts: struct.Struct) -> struct.Struct:
    return struct.Struct("<" + "".join(p.format.lstrip("<") for p in parts))


HTTP_RECORD = _joined(HEADER, COOKIE, TUPLE, REQ, TPCTX)
CONN_RECORD = _joined(HEADER, CONN_COUNTS, TUPLE)
GO_SPAWN_RECORD = _joined(HEADER, GO_SPAWN_BODY)
LOST_RECORD = _joined(HEADER, LOST_BODY, TUPLE)
HTTP_SIZE = HTTP_RECORD.size  # 512, asserted in the C source
CONN_SIZE = CONN_RECORD.size  # 96
GO_SPAWN_SIZE = GO_SPAWN_RECORD.size  # 48
LOST_SIZE = LOST_RECORD.size  # 104
THREAD_SPAWN_SIZE = HEADER.size + THREAD_SPAWN_BODY.size  # 40
EXIT_SIZE = HEADER.size
EXEC_SIZE = HEADER.size + EXEC_FIXED.size + FILENAME_MAX

RECORD_SIZES: dict[int, int] = {
    Kind.THREAD_SPAWN: THREAD_SPAWN_SIZE, Kind.TASK_EXIT: EXIT_SIZE, Kind.EXEC: EXEC_SIZE,
    Kind.CONN_OPEN: CONN_SIZE, Kind.CONN_CLOSE: CONN_SIZE, Kind.HTTP: HTTP_SIZE,
    Kind.GO_SPAWN: GO_SPAWN_SIZE, Kind.HTTP_LOST: LOST_SIZE,
}

AF_INET = 2
TP_ASSIGNED, TP_INJECTED = 1, 2
INTERNAL_FLAGS = 0x80
ROLES: dict[int, pb.Role.ValueType] = {1: pb.ROLE_SERVER, 2: pb.ROLE_CLIENT}
_KIND_VERSION = struct.Struct("<HH")  # weft_hdr.kind, weft_hdr.version
_KIND_OFF = 24


def cstr(raw: bytes, length: int | None = None) -> str:
    """A fixed-size C char field as text (up to the NUL or `length`)."""
    if length is not None:
        raw = raw[:length]
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "replace")


_V4_MAPPED = bytes(10) + b"\xff\xff"   # ::ffff:a.b.c.d, an IPv4 address on an IPv6 socket


def _fill_tuple(t: pb.Tuple, laddr: bytes, raddr: bytes, lport: int, rport: int, family: int) -> None:
    if family == AF_INET:
        laddr, raddr = laddr[:4], raddr[:4]
    elif laddr[:12] == _V4_MAPPED and raddr[:12] == _V4_MAPPED:
        # An IPv4 connection accepted by a dual-stack listener (Go's and Node's ":8080"): the
        # other end's socket is plain IPv4 and names it so. Naming it alike on both ends keeps
        # one tuple per connection (a cross-node hop is not taken for NAT), and addresses read
        # as the IPv4 they are.
        laddr, raddr = laddr[12:16], raddr[12:16]
    else:
        laddr, raddr = laddr[:16], raddr[:16]
    t.local_addr = laddr
    t.local_port = lport
    t.remote_addr = raddr
    t.remote_port = rport


# Each decoder fills `event` (a fresh pb.Event, often one already inside a frame: nothing is
# copied) from the record at `buf[off:]`, whose size the caller has checked.
Filler = Callable[[pb.Event, bytes, int, int], None]


def _http(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    """Fields are set only when not empty: most requests carry no traceparent, tracestate or
    goroutine id."""
    (_ts, _cgroup, _hpid, _htid, _kind, _version, _reserved, cookie,
     laddr, raddr, lport, rport, family, role, _mid,
     start, end, pid, tid, seq, status, has_seq, flags, m_len, p_len, h_len, tp_len, ts_len, _done, _nb,
     method, path, host, tp, ts, goid,
     _serial, tp_trace, tp_span, tp_kind, tp_unsampled) = HTTP_RECORD.unpack_from(buf, off)
    req = event.http
    req.role = ROLES.get(role, pb.ROLE_UNSPECIFIED)
    req.start_ns = start + offset_ns
    if end:
        req.end_ns = end + offset_ns
    req.pid = pid
    req.tid = tid
    if goid:
        req.goid = goid
    req.sock_cookie = cookie
    _fill_tuple(req.tuple, laddr, raddr, lport, rport, family)
    req.tcp_seq = seq
    req.has_seq = bool(has_seq)
    req.method = method[:m_len].decode("latin-1")
    req.path = path[:p_len].decode("latin-1")
    if h_len:
        req.host = host[:h_len].decode("latin-1")
    if tp_len:
        req.traceparent = tp[:tp_len].decode("latin-1")
    if ts_len:
        req.tracestate = ts[:ts_len].decode("latin-1")
    req.status = status
    if flags & ~INTERNAL_FLAGS:
        req.flags = flags & ~INTERNAL_FLAGS
    if tp_kind:  # header injection on
        # the flags the injector wrote: 00 when the agent's sampler left the trace out
        ours = f"00-{tp_trace.decode('latin-1')}-{tp_span.decode('latin-1')}-0{0 if tp_unsampled else 1}"
        if tp_kind == TP_ASSIGNED:
            req.assigned_traceparent = ours
        elif tp_kind == TP_INJECTED:
            req.injected_traceparent = ours


def _conn(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    (ts, _cgroup, pid, tid, kind, _version, _reserved, cookie, sent, received,
     laddr, raddr, lport, rport, family, role, mid_stream) = CONN_RECORD.unpack_from(buf, off)
    if kind == Kind.CONN_OPEN:
        opened = event.conn_open
        opened.ts_ns = ts + offset_ns
        opened.pid, opened.tid, opened.sock_cookie = pid, tid, cookie
        opened.role = ROLES.get(role, pb.ROLE_UNSPECIFIED)
        _fill_tuple(opened.tuple, laddr, raddr, lport, rport, family)
        opened.seen_mid_stream = bool(mid_stream)
        return
    closed = event.conn_close
    closed.ts_ns = ts + offset_ns
    closed.pid, closed.tid, closed.sock_cookie = pid, tid, cookie
    closed.role = ROLES.get(role, pb.ROLE_UNSPECIFIED)
    _fill_tuple(closed.tuple, laddr, raddr, lport, rport, family)
    closed.bytes_sent, closed.bytes_received = sent, received


def _go_spawn(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    ts, _cgroup, pid, tid, _kind, _version, _reserved, parent, child = GO_SPAWN_RECORD.unpack_from(buf, off)
    spawn = event.goroutine_spawn
    spawn.ts_ns = ts + offset_ns
    spawn.pid, spawn.tid, spawn.parent_goid, spawn.child_goid = pid, tid, parent, child


def _lost_http(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    (start, _cgroup, pid, tid, _kind, _version, _reserved, cookie, end, goid, seq, has_seq,
     laddr, raddr, lport, rport, family, role, _mid) = LOST_RECORD.unpack_from(buf, off)
    lost = event.lost_http
    lost.role = ROLES.get(role, pb.ROLE_UNSPECIFIED)
    lost.start_ns = start + offset_ns
    if end:
        lost.end_ns = end + offset_ns
    lost.pid, lost.tid, lost.sock_cookie = pid, tid, cookie
    if goid:
        lost.goid = goid
    _fill_tuple(lost.tuple, laddr, raddr, lport, rport, family)
    lost.tcp_seq, lost.has_seq = seq, bool(has_seq)


def _thread_spawn(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    ts, _cgroup, pid, tid, _kind, _version, _reserved = HEADER.unpack_from(buf, off)
    child_pid, child_tid = THREAD_SPAWN_BODY.unpack_from(buf, off + HEADER.size)
    spawn = event.thread_spawn
    spawn.ts_ns = ts + offset_ns
    spawn.parent_pid, spawn.parent_tid = pid, tid
    spawn.child_pid, spawn.child_tid = child_pid, child_tid
    spawn.new_process = child_pid != pid


def _task_exit(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    ts, _cgroup, pid, tid, _kind, _version, _reserved = HEADER.unpack_from(buf, off)
    ended = event.task_exit
    ended.ts_ns, ended.pid, ended.tid = ts + offset_ns, pid, tid


def _exec(event: pb.Event, buf: bytes, off: int, offset_ns: int) -> None:
    """What the kernel knows of an exec; the agent merges /proc details over it."""
    ts, cgroup, pid, _tid, _kind, _version, _reserved = HEADER.unpack_from(buf, off)
    start_ns, ppid, name_len = EXEC_FIXED.unpack_from(buf, off + HEADER.size)
    name_at = off + HEADER.size + EXEC_FIXED.size
    exe = os.path.basename(cstr(buf[name_at:name_at + FILENAME_MAX], name_len))
    info = event.process
    info.ts_ns, info.pid, info.ppid, info.exe, info.service_name = ts + offset_ns, pid, ppid, exe, exe
    info.cgroup_id = cgroup
    if start_ns:
        info.start_ns = start_ns + offset_ns


FILLERS: dict[int, Filler] = {
    Kind.THREAD_SPAWN: _thread_spawn, Kind.TASK_EXIT: _task_exit, Kind.EXEC: _exec,
    Kind.CONN_OPEN: _conn, Kind.CONN_CLOSE: _conn, Kind.HTTP: _http, Kind.GO_SPAWN: _go_spawn,
    Kind.HTTP_LOST: _lost_http,
}


def fill_event(event: pb.Event, buf: bytes, off: int, size: int, offset_ns: int,
               kinds: frozenset[int] | None = None) -> None:
    """Decode the `size`-byte record at `buf[off:]` into `event`; AbiError when it cannot be
    read (or its kind is not in `kinds`, when given: each ring carries only some kinds)."""
    if size < HEADER.size:
        raise AbiError(f"record of {size} bytes is shorter than the {HEADER.size}-byte header")
    kind, version = _KIND_VERSION.unpack_from(buf, off + _KIND_OFF)
    if version not in SUPPORTED_ABI_VERSIONS:
        raise AbiError(f"record ABI version {version}, this decoder reads {ABI_VERSION}")
    filler = FILLERS.get(kind)
    if filler is None or (kinds is not None and kind not in kinds):
        raise AbiError(f"record of unexpected kind {kind}")
    need = RECORD_SIZES[kind]
    if size < need:
        raise AbiError(f"{EVENT_KIND_OF[kind]} record of {size} bytes, expected {need}")
    filler(event, buf, off, offset_ns)


def decode(raw: bytes, ktime_offset_ns: int, kinds: frozenset[int] | None = None) -> list[pb.Event]:
    """One record as it came from a ring, as a list of one event."""
    event = pb.Event()
    fill_event(event, raw, 0, len(raw), ktime_offset_ns, kinds)
    return [event]


# -- the envelope ----------------------------------------------------------------------------

ENVELOPE_HEAD = struct.Struct("<II")  # length (bit 30: discarded), reserved
DISCARDED = 1 << 30
_LENGTH_MASK = (1 << 30) - 1


def envelope_record(record: bytes) -> bytes:
    """One record in envelope framing (what the ring buffer holds; used by tests and tools)."""
    return ENVELOPE_HEAD.pack(len(record), 0) + record + bytes(-len(record) % 8)


def iter_envelope(blob: bytes) -> Iterator[tuple[int, int]]:
    """(offset, size) of each record in an envelope, discarded ones skipped; AbiError when the
    framing runs past the end."""
    pos, end = 0, len(blob)
    head = ENVELOPE_HEAD.size
    while pos < end:
        if pos + head > end:
            raise AbiError(f"envelope ends inside a record header at byte {pos}")
        length, _reserved = ENVELOPE_HEAD.unpack_from(blob, pos)
        if length & (1 << 31):
            raise AbiError(f"envelope holds an unfinished record at byte {pos}")
        size = length & _LENGTH_MASK
        if pos + head + size > end:
            raise AbiError(f"record at byte {pos} claims {size} bytes, {end - pos - head} remain")
        if not length & DISCARDED:
            yield pos + head, size
        pos += head + ((size + 7) & ~7)


MAX_PLAIN_SIZE = 64 << 20  # far above any frame (Kafka's default message limit is 1 MiB)


def compress_records(raw: pb.RawRecords, plain: bytes) -> None:
    """Store `plain` (envelope bytes) in `raw` as one LZ4 block."""
    raw.records = bytes(cramjam.lz4.compress_block(plain, store_size=False))
    raw.compression = pb.RECORDS_LZ4_BLOCK
    raw.plain_size = len(plain)


def plain_records(raw: pb.RawRecords) -> bytes:
    """The envelope bytes of `raw`, decompressed if stored compressed; AbiError when they
    cannot be (an unknown method, a corrupt block, a size that does not match)."""
    if raw.compression == pb.RECORDS_PLAIN:
        return raw.records
    if raw.compression != pb.RECORDS_LZ4_BLOCK:
        raise AbiError(f"raw records compressed with unknown method {raw.compression}")
    if raw.plain_size > MAX_PLAIN_SIZE:
        raise AbiError(f"raw records claim {raw.plain_size} bytes uncompressed, "
                       f"more than the {MAX_PLAIN_SIZE} allowed")
    try:
        plain = bytes(cramjam.lz4.decompress_block(raw.records, output_len=raw.plain_size))
    except cramjam.DecompressionError:
        raise AbiError("raw records: corrupt LZ4 block") from None
    if len(plain) != raw.plain_size:
        raise AbiError(f"raw records: LZ4 block holds {len(plain)} bytes, "
                       f"plain_size says {raw.plain_size}")
    return plain


def expand(raw: pb.RawRecords, into: list[pb.Event] | None = None,
           add: Callable[[], pb.Event] | None = None) -> int:
    """Decode every record of a RawRecords event; each event comes from `add()` (e.g. a frame's
    `events.add`, so nothing is copied) or is appended to `into`. Returns the number decoded;
    AbiError on any record that cannot be read, or a count that does not match."""
    if raw.abi_version not in SUPPORTED_ABI_VERSIONS:
        raise AbiError(f"raw records of ABI version {raw.abi_version}, this decoder reads "
                       f"{sorted(SUPPORTED_ABI_VERSIONS)}")
    blob, offset_ns = plain_records(raw), raw.ktime_offset_ns
    n = 0
    for off, size in iter_envelope(blob):
        if add is not None:
            event = add()
        else:
            event = pb.Event()
            if into is not None:
                into.append(event)
        fill_event(event, blob, off, size, offset_ns)
        n += 1
    if n != raw.count:
        raise AbiError(f"raw records say {raw.count} records, the envelope holds {n}")
    return n
