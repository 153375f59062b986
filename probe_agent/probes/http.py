"""Loader for bpf/http_tracer.bpf.c: TCP connections and HTTP/1.x requests (server and client)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from probe_agent.btf import member_offset
from probe_agent.probes.abi import ABI_VERSION, HEADER, AbiError, Kind
from probe_agent.probes.base import BPF_DIR, ProbeContext, RingSpec, common_cflags, fill_cgroup_filter
from schemas import weft_events_pb2 as pb

if TYPE_CHECKING:
    from bcc import BPF

SCAN_MAX = 1024  # bytes of each read/write the kernel parses (power of two)
WINDOW = 128  # bytes per parser run; SCAN_MAX / WINDOW tail calls at most (kernel limit 33)

# struct tuple: laddr, raddr, lport, rport, family, role, mid_stream, pad
TUPLE = struct.Struct("<16s16sHHBBBx")
# struct req (fixed part): start, end, pid, tid, seq, status, has_seq, flags, method_len, path_len,
# host_len, tp_len, ts_len, done_headers, no_body, pad; then method[8] path[128] host[64] tp[56] ts[64],
# goid (Go only, else 0)
REQ = struct.Struct("<QQIIIHBBBBBBBBBx8s128s64s56s64sQ")
COOKIE = struct.Struct("<Q")
CONN_COUNTS = struct.Struct("<QQQ")  # cookie, bytes_sent, bytes_recv
# WEFT-INJECT: struct weft_tpctx (bpf/inject.h): serial, trace hex, span hex, kind, pad
TPCTX = struct.Struct("<Q32s16sB7x")
TP_ASSIGNED, TP_INJECTED = 1, 2
HTTP_SIZE = HEADER.size + COOKIE.size + TUPLE.size + REQ.size + TPCTX.size  # 512, asserted in C
CONN_SIZE = HEADER.size + CONN_COUNTS.size + TUPLE.size  # 96

AF_INET = 2
_ROLES: dict[int, pb.Role.ValueType] = {1: pb.ROLE_SERVER, 2: pb.ROLE_CLIENT}
_INTERNAL_FLAGS = 0x80


# The whole HTTP record in one unpack (the per-record cost matters: one per request per side).
HTTP_RECORD = struct.Struct("<" + "".join(s.format.lstrip("<") for s in (HEADER, COOKIE, TUPLE, REQ, TPCTX)))
CONN_RECORD = struct.Struct("<" + "".join(s.format.lstrip("<") for s in (HEADER, CONN_COUNTS, TUPLE)))
_KIND_VERSION = struct.Struct("<HH")  # weft_hdr.kind, weft_hdr.version
_KIND_OFF = 24


def _fill_tuple(t: pb.Tuple, laddr: bytes, raddr: bytes, lport: int, rport: int, family: int) -> None:
    n = 4 if family == AF_INET else 16
    t.local_addr = laddr[:n]
    t.local_port = lport
    t.remote_addr = raddr[:n]
    t.remote_port = rport


def _http(raw: bytes, offset_ns: int) -> pb.Event:
    """Fields are set on the event's own sub-messages (no intermediate messages to copy), and
    only when not empty: most requests carry no traceparent, tracestate or goroutine id."""
    (_ts, _cgroup, _hpid, _htid, _kind, _version, _reserved, cookie,
     laddr, raddr, lport, rport, family, role, _mid,
     start, end, pid, tid, seq, status, has_seq, flags, m_len, p_len, h_len, tp_len, ts_len, _done, _nb,
     method, path, host, tp, ts, goid,
     _serial, tp_trace, tp_span, tp_kind) = HTTP_RECORD.unpack_from(raw)
    event = pb.Event()
    req = event.http
    req.role = _ROLES.get(role, pb.ROLE_UNSPECIFIED)
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
    if flags & ~_INTERNAL_FLAGS:
        req.flags = flags & ~_INTERNAL_FLAGS
    if tp_kind:  # WEFT-INJECT
        ours = f"00-{tp_trace.decode('latin-1')}-{tp_span.decode('latin-1')}-01"
        if tp_kind == TP_ASSIGNED:
            req.assigned_traceparent = ours
        elif tp_kind == TP_INJECTED:
            req.injected_traceparent = ours
    return event


def _conn(raw: bytes, offset_ns: int) -> pb.Event:
    (ts, _cgroup, pid, tid, kind, _version, _reserved, cookie, sent, received,
     laddr, raddr, lport, rport, family, role, mid_stream) = CONN_RECORD.unpack_from(raw)
    event = pb.Event()
    if kind == Kind.CONN_OPEN:
        opened = event.conn_open
        opened.ts_ns = ts + offset_ns
        opened.pid, opened.tid, opened.sock_cookie = pid, tid, cookie
        opened.role = _ROLES.get(role, pb.ROLE_UNSPECIFIED)
        _fill_tuple(opened.tuple, laddr, raddr, lport, rport, family)
        opened.seen_mid_stream = bool(mid_stream)
        return event
    closed = event.conn_close
    closed.ts_ns = ts + offset_ns
    closed.pid, closed.tid, closed.sock_cookie = pid, tid, cookie
    closed.role = _ROLES.get(role, pb.ROLE_UNSPECIFIED)
    _fill_tuple(closed.tuple, laddr, raddr, lport, rport, family)
    closed.bytes_sent, closed.bytes_received = sent, received
    return event


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    if len(raw) < HEADER.size:
        raise AbiError(f"record of {len(raw)} bytes is shorter than the {HEADER.size}-byte header")
    kind, version = _KIND_VERSION.unpack_from(raw, _KIND_OFF)
    if version != ABI_VERSION:
        raise AbiError(f"record ABI version {version}, this decoder reads {ABI_VERSION}")
    if kind == Kind.HTTP:
        if len(raw) < HTTP_SIZE:
            raise AbiError(f"HTTP record of {len(raw)} bytes, expected {HTTP_SIZE}")
        return [_http(raw, ktime_offset_ns)]
    if kind in (Kind.CONN_OPEN, Kind.CONN_CLOSE):
        if len(raw) < CONN_SIZE:
            raise AbiError(f"connection record of {len(raw)} bytes, expected {CONN_SIZE}")
        return [_conn(raw, ktime_offset_ns)]
    raise AbiError(f"http ring carried a record of kind {kind}")


_OFFSETS = {
    "WEFT_TCP_COPIED_SEQ_OFF": ("tcp_sock", "copied_seq"),
    "WEFT_TCP_WRITE_SEQ_OFF": ("tcp_sock", "write_seq"),
    "WEFT_SKC_FAMILY_OFF": ("sock_common", "skc_family"),
    "WEFT_SKC_DPORT_OFF": ("sock_common", "skc_dport"),
    "WEFT_SKC_NUM_OFF": ("sock_common", "skc_num"),
    "WEFT_SKC_RCV_SADDR_OFF": ("sock_common", "skc_rcv_saddr"),
    "WEFT_SKC_DADDR_OFF": ("sock_common", "skc_daddr"),
    "WEFT_SKC_V6_RCV_SADDR_OFF": ("sock_common", "skc_v6_rcv_saddr"),
    "WEFT_SKC_V6_DADDR_OFF": ("sock_common", "skc_v6_daddr"),
    "WEFT_SKC_COOKIE_OFF": ("sock_common", "skc_cookie"),
    "WEFT_SK_PROTOCOL_OFF": ("sock", "sk_protocol"),
    "WEFT_TASK_FILES_OFF": ("task_struct", "files"),
    "WEFT_FILES_FDT_OFF": ("files_struct", "fdt"),
    "WEFT_FDT_FD_OFF": ("fdtable", "fd"),
    "WEFT_FILE_PRIVATE_OFF": ("file", "private_data"),
    "WEFT_SOCKET_SK_OFF": ("socket", "sk"),
    "WEFT_PT_REGS_R14_OFF": ("pt_regs", "r14"),  # Go: the current g (goroutine ids)
    "WEFT_PT_REGS_SP_OFF": ("pt_regs", "sp"),
}


class HttpProbe:
    """TCP connections and one record per HTTP/1.x request; see the header of http_tracer.bpf.c."""

    name = "http"
    source: Path = BPF_DIR / "http_tracer.bpf.c"
    rings: Sequence[RingSpec] = (RingSpec("http_events", decode),)
    stats_map = "stats"
    stat_names: Sequence[str] = ("ring_full", "conns_full", "queue_full", "calls_full", "adopted", "not_http")

    def cflags(self, ctx: ProbeContext) -> list[str]:
        flags = [*common_cflags(ctx), f"-DWEFT_SCAN_MAX={SCAN_MAX}", f"-DWEFT_WINDOW={WINDOW}"]
        for name, (struct_name, member) in _OFFSETS.items():
            flags.append(f"-D{name}={member_offset(struct_name, member, ctx.btf_path)}")
        return flags

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Tracepoints attach at load; this installs the parser reached by tail call."""
        from bcc import BPF as _BPF

        parser = bpf.load_func(b"weft_parse", _BPF.TRACEPOINT)
        bpf[b"parsers"][ctypes.c_int(0)] = ctypes.c_int(parser.fd)

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        fill_cgroup_filter(bpf, ctx)

    def detach(self, bpf: BPF) -> None:
        """Nothing beyond bpf.cleanup()."""
