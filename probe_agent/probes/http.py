"""Loader for bpf/http_tracer.bpf.c: TCP connections and HTTP/1.x requests (server and client)."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from probe_agent.btf import member_offset
from probe_agent.probes.base import (
    BPF_DIR,
    LOW_VOLUME_RING_SHARE,
    ProbeContext,
    RingSpec,
    common_cflags,
    fill_cgroup_filter,
)
from schemas import records
from schemas import weft_events_pb2 as pb
from schemas.records import (  # the layouts, re-exported for tests/unit/test_bpf_abi.py
    CONN_RECORD,
    CONN_SIZE,
    COOKIE,
    HTTP_RECORD,
    HTTP_SIZE,
    LOST_SIZE,
    REQ,
    TP_ASSIGNED,
    TP_INJECTED,
    TPCTX,
    TUPLE,
    Kind,
)

if TYPE_CHECKING:
    from bcc import BPF

__all__ = ["CONN_RECORD", "CONN_SIZE", "COOKIE", "HTTP_RECORD", "HTTP_SIZE", "LOST_SIZE", "REQ", "TPCTX",
           "TP_ASSIGNED", "TP_INJECTED", "TUPLE", "HttpProbe", "decode"]

SCAN_MAX = 1024  # bytes of each read/write the kernel parses (power of two)
WINDOW = 128  # bytes per parser run; SCAN_MAX / WINDOW tail calls at most (kernel limit 33)

HTTP_KINDS = frozenset({Kind.HTTP})
# the connection ring also carries what is left of an HTTP record the HTTP ring had no room for
CONN_KINDS = frozenset({Kind.CONN_OPEN, Kind.CONN_CLOSE, Kind.HTTP_LOST})


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    """One record of the http ring (see schemas/records.py for the layouts)."""
    return records.decode(raw, ktime_offset_ns, HTTP_KINDS)


def decode_conn(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    """One record of the connection ring."""
    return records.decode(raw, ktime_offset_ns, CONN_KINDS)


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
    "WEFT_PT_REGS_R14_OFF": ("pt_regs", "r14"),  # Go: the current g (goroutine ids)
    "WEFT_PT_REGS_SP_OFF": ("pt_regs", "sp"),
    "WEFT_PT_REGS_DX_OFF": ("pt_regs", "dx"),  # a socket call's syscall: dx, si, di, orig_ax
}
# struct sysargs in the C reads these four saved registers with one copy from dx on.
_SYSARGS = ("dx", "si", "di", "orig_ax")

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl: a stable ABI) of the calls
# whose bytes the tracer parses; the agent's other parts are x86-64 only too (Go R14, ring reader).
SYSCALLS_X86_64 = {"READ": 0, "WRITE": 1, "READV": 19, "WRITEV": 20, "SENDFILE": 40, "SENDTO": 44,
                   "RECVFROM": 45, "SENDMSG": 46, "RECVMSG": 47, "SHUTDOWN": 48}


class HttpProbe:
    """TCP connections and one record per HTTP/1.x request; see the header of http_tracer.bpf.c."""

    name = "http"
    source: Path = BPF_DIR / "http_tracer.bpf.c"
    rings: Sequence[RingSpec] = (
        RingSpec("http_events", decode, passthrough=HTTP_KINDS, record_size=HTTP_SIZE),
        RingSpec("conn_events", decode_conn, passthrough=CONN_KINDS),
    )
    stats_map = "stats"
    stat_names: Sequence[str] = ("ring_full", "conns_full", "queue_full", "unparsed", "adopted", "not_http",
                                 "conn_ring_full", "unmarked", "other_protocol")
    blind_stats: Sequence[str] = ("unmarked",)  # an HTTP record lost, its marker too

    def cflags(self, ctx: ProbeContext) -> list[str]:
        if platform.machine() != "x86_64":
            raise ValueError(f"the HTTP tracer supports x86-64 only, not {platform.machine()}")
        conn_pages = max(1, ctx.ring_pages // LOW_VOLUME_RING_SHARE)
        flags = [*common_cflags(ctx), f"-DWEFT_SCAN_MAX={SCAN_MAX}", f"-DWEFT_WINDOW={WINDOW}",
                 f"-DWEFT_CONN_RING_PAGES={conn_pages}"]
        for name, (struct_name, member) in _OFFSETS.items():
            flags.append(f"-D{name}={member_offset(struct_name, member, ctx.btf_path)}")
        dport, num = (member_offset("sock_common", m, ctx.btf_path) for m in ("skc_dport", "skc_num"))
        if num != dport + 2:
            raise ValueError(f"sock_common skc_dport/skc_num are not adjacent here ({dport}, {num})")
        regs = [member_offset("pt_regs", r, ctx.btf_path) for r in _SYSARGS]
        if regs != list(range(regs[0], regs[0] + 8 * len(regs), 8)):
            raise ValueError(f"pt_regs {', '.join(_SYSARGS)} are not adjacent here (offsets {regs})")
        flags += [f"-DWEFT_NR_{name}={nr}" for name, nr in SYSCALLS_X86_64.items()]
        return flags

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        """(Raw) tracepoints attach at load; this installs the parser reached by tail call."""
        from bcc import BPF as _BPF

        parser = bpf.load_func(b"weft_parse", _BPF.RAW_TRACEPOINT)
        bpf[b"parsers"][ctypes.c_int(0)] = ctypes.c_int(parser.fd)

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        fill_cgroup_filter(bpf, ctx)

    def detach(self, bpf: BPF) -> None:
        """Nothing beyond bpf.cleanup()."""
