"""The kernel/user boundary: C kinds, versions and record sizes agree with the Python decoders."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest

from probe_agent.probes import goroutines, http, lineage
from probe_agent.probes.abi import ABI_VERSION, HEADER, AbiError, Kind
from probe_agent.probes.base import BPF_DIR
from schemas import weft_events_pb2 as pb

COMMON = (BPF_DIR / "common.h").read_text()


def static_sizes(path: Path) -> dict[str, int]:
    return {
        m[0]: int(m[1])
        for m in re.findall(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)", path.read_text())
    }


def test_kinds_and_version_match_common_h() -> None:
    kinds = {name: int(v) for name, v in re.findall(r"WEFT_KIND_(\w+) = (\d+)", COMMON)}
    assert kinds == {k.name: k.value for k in Kind}
    assert int(re.search(r"#define WEFT_ABI_VERSION (\d+)", COMMON)[1]) == ABI_VERSION  # type: ignore[index]


def test_header_layout_matches_common_h() -> None:
    body = re.search(r"struct weft_hdr \{(.*?)\};", COMMON, re.S)[1]  # type: ignore[index]
    fields = re.findall(r"^\s*(u64|u32|u16) (\w+);", body, re.M)
    codes = {"u64": "Q", "u32": "I", "u16": "H"}
    assert "<" + "".join(codes[t] for t, _ in fields) == HEADER.format
    assert HEADER.size == 32


def test_record_sizes_match_c_static_asserts() -> None:
    assert static_sizes(http.HttpProbe.source) == {"http_rec": http.HTTP_SIZE, "conn_rec": http.CONN_SIZE,
                                                   "lost_rec": http.LOST_SIZE}
    assert static_sizes(lineage.LineageProbe.source) == {
        "spawn_rec": lineage.SPAWN_SIZE,
        "exit_rec": lineage.EXIT_SIZE,
        "exec_rec": lineage.EXEC_SIZE,
    }


def hdr(kind: Kind, ts: int = 1_000, pid: int = 10, tid: int = 11, version: int = ABI_VERSION) -> bytes:
    return HEADER.pack(ts, 77, pid, tid, kind, version, 0)


def test_http_record_decodes_exact_fields() -> None:
    tup = http.TUPLE.pack(socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"), 8080, 5555, 2, 1, 0)
    req = http.REQ.pack(
        1_000,
        2_000,
        10,
        12,
        0xFFFFFFF0,
        200,
        1,
        0x80 | 4,
        3,
        2,
        4,
        3,
        1,
        1,
        0,
        b"GET",
        b"/a",
        b"host",
        b"tp!",
        b"s",
        4242,
    )
    raw = hdr(Kind.HTTP) + struct.pack("<Q", 99) + tup + req + bytes(http.TPCTX.size)  # no injection ids
    (event,) = http.decode(raw, 5)
    assert event.http == pb.HttpRequest(
        role=pb.ROLE_SERVER,
        start_ns=1_005,
        end_ns=2_005,
        pid=10,
        tid=12,
        goid=4242,
        sock_cookie=99,
        tuple=pb.Tuple(
            local_addr=socket.inet_aton("10.0.0.1"),
            local_port=8080,
            remote_addr=socket.inet_aton("10.0.0.2"),
            remote_port=5555,
        ),
        tcp_seq=0xFFFFFFF0,
        has_seq=True,
        method="GET",
        path="/a",
        host="host",
        traceparent="tp!",
        tracestate="s",
        status=200,
        flags=pb.HTTP_FLAG_PIPELINED,
    )


def test_conn_record_decodes_ipv6_tuple() -> None:
    six = socket.inet_pton(socket.AF_INET6, "::1")
    tup = http.TUPLE.pack(six, six, 80, 40000, 10, 2, 1)
    raw = hdr(Kind.CONN_OPEN) + struct.pack("<QQQ", 5, 0, 0) + tup
    (event,) = http.decode_conn(raw, 0)
    assert event.conn_open.tuple.local_addr == six and event.conn_open.role == pb.ROLE_CLIENT
    assert event.conn_open.seen_mid_stream


def test_lineage_records_decode() -> None:
    (spawn,) = lineage.decode(hdr(Kind.THREAD_SPAWN) + struct.pack("<II", 10, 13), 0)
    assert spawn.thread_spawn == pb.ThreadSpawn(
        ts_ns=1_000, parent_pid=10, parent_tid=11, child_pid=10, child_tid=13, new_process=False
    )
    name = b"/usr/bin/python3.11"
    raw = (
        hdr(Kind.EXEC) + lineage.EXEC_FIXED.pack(500, 1, len(name)) + name.ljust(lineage.FILENAME_MAX, b"\0")
    )
    (info,) = lineage.decode(raw, 10)
    assert (info.process.exe, info.process.ppid, info.process.start_ns, info.process.cgroup_id) == (
        "python3.11",
        1,
        510,
        77,
    )


def test_newer_abi_version_is_refused() -> None:
    with pytest.raises(AbiError, match="ABI version 2"):
        http.decode(hdr(Kind.HTTP, version=2) + bytes(http.HTTP_SIZE), 0)
    with pytest.raises(AbiError, match="kind"):
        lineage.decode(hdr(Kind.HTTP), 0)


def test_goroutine_spawn_record_layout_and_decode() -> None:
    assert static_sizes(goroutines.GoroutineProbe.source) == {"go_spawn_rec": goroutines.SPAWN_SIZE}
    raw = hdr(Kind.GO_SPAWN, ts=2_000, pid=40, tid=41) + struct.pack("<QQ", 7, 2**40 + 3)
    (event,) = goroutines.decode(raw, 5)
    assert event.goroutine_spawn == pb.GoroutineSpawn(ts_ns=2_005, pid=40, tid=41, parent_goid=7,
                                                      child_goid=2**40 + 3)
    with pytest.raises(AbiError):
        goroutines.decode(raw[:-1], 0)
    with pytest.raises(AbiError):
        goroutines.decode(hdr(Kind.HTTP) + raw[32:], 0)
