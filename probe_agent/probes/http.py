"""Loader for bpf/http_tracer.bpf.c: TCP connections and HTTP/1.x requests (server and client)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from probe_agent.btf import member_offset
from probe_agent.probes.abi import HEADER, AbiError, Header, Kind, read_header
from probe_agent.probes.base import BPF_DIR, ProbeContext, RingSpec, common_cflags, fill_cgroup_filter
from schemas import weft_events_pb2 as pb

if TYPE_CHECKING:
    from bcc import BPF

SCAN_MAX = 1024  # bytes of each read/write the kernel parses (power of two)
WINDOW = 128  # bytes per parser run; SCAN_MAX / WINDOW tail calls at most (kernel limit 33)

# struct tuple: laddr, raddr, lport, rport, family, role, mid_stream, pad
TUPLE = struct.Struct("<16s16sHHBBBx")
# struct req (fixed part): start, end, pid, tid, seq, status, has_seq, flags, method_len, path_len,
# host_len, tp_len, ts_len, done_headers, no_body, pad; then method[8] path[128] host[64] tp[56] ts[64]
REQ = struct.Struct("<QQIIIHBBBBBBBBBx8s128s64s56s64s")
COOKIE = struct.Struct("<Q")
CONN_COUNTS = struct.Struct("<QQQ")  # cookie, bytes_sent, bytes_recv
HTTP_SIZE = HEADER.size + COOKIE.size + TUPLE.size + REQ.size  # 440, asserted in the C source
CONN_SIZE = HEADER.size + CONN_COUNTS.size + TUPLE.size  # 96

AF_INET = 2
_ROLES: dict[int, pb.Role.ValueType] = {1: pb.ROLE_SERVER, 2: pb.ROLE_CLIENT}
_INTERNAL_FLAGS = 0x80


def _tuple(raw: bytes, off: int) -> tuple[pb.Tuple, pb.Role.ValueType, bool]:
    laddr, raddr, lport, rport, family, role, mid_stream = TUPLE.unpack_from(raw, off)
    n = 4 if family == AF_INET else 16
    t = pb.Tuple(local_addr=laddr[:n], local_port=lport, remote_addr=raddr[:n], remote_port=rport)
    return t, _ROLES.get(role, pb.ROLE_UNSPECIFIED), bool(mid_stream)


def _text(field: bytes, length: int) -> str:
    return field[: min(length, len(field))].decode("latin-1")


def _http(h: Header, raw: bytes, offset_ns: int) -> pb.Event:
    (cookie,) = COOKIE.unpack_from(raw, HEADER.size)
    tup, role, _ = _tuple(raw, HEADER.size + COOKIE.size)
    (
        start,
        end,
        pid,
        tid,
        seq,
        status,
        has_seq,
        flags,
        m_len,
        p_len,
        h_len,
        tp_len,
        ts_len,
        _done,
        _nb,
        method,
        path,
        host,
        tp,
        ts,
    ) = REQ.unpack_from(raw, HEADER.size + COOKIE.size + TUPLE.size)
    req = pb.HttpRequest(
        role=role,
        start_ns=start + offset_ns,
        end_ns=end + offset_ns if end else 0,
        pid=pid,
        tid=tid,
        sock_cookie=cookie,
        tuple=tup,
        tcp_seq=seq,
        has_seq=bool(has_seq),
        method=_text(method, m_len),
        path=_text(path, p_len),
        host=_text(host, h_len),
        traceparent=_text(tp, tp_len),
        tracestate=_text(ts, ts_len),
        status=status,
        flags=flags & ~_INTERNAL_FLAGS,
    )
    return pb.Event(http=req)


def _conn(h: Header, raw: bytes, offset_ns: int) -> pb.Event:
    cookie, sent, received = CONN_COUNTS.unpack_from(raw, HEADER.size)
    tup, role, mid_stream = _tuple(raw, HEADER.size + CONN_COUNTS.size)
    ts = h.ts_ns + offset_ns
    if h.kind == Kind.CONN_OPEN:
        return pb.Event(
            conn_open=pb.ConnectionOpen(
                ts_ns=ts,
                pid=h.pid,
                tid=h.tid,
                sock_cookie=cookie,
                role=role,
                tuple=tup,
                seen_mid_stream=mid_stream,
            )
        )
    return pb.Event(
        conn_close=pb.ConnectionClose(
            ts_ns=ts,
            pid=h.pid,
            tid=h.tid,
            sock_cookie=cookie,
            role=role,
            tuple=tup,
            bytes_sent=sent,
            bytes_received=received,
        )
    )


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    h = read_header(raw)
    if h.kind == Kind.HTTP:
        if len(raw) < HTTP_SIZE:
            raise AbiError(f"HTTP record of {len(raw)} bytes, expected {HTTP_SIZE}")
        return [_http(h, raw, ktime_offset_ns)]
    if h.kind in (Kind.CONN_OPEN, Kind.CONN_CLOSE):
        if len(raw) < CONN_SIZE:
            raise AbiError(f"connection record of {len(raw)} bytes, expected {CONN_SIZE}")
        return [_conn(h, raw, ktime_offset_ns)]
    raise AbiError(f"http ring carried a record of kind {h.kind}")


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
