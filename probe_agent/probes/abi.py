"""Python side of bpf/common.h: record kinds, the shared header, and the ABI version.

tests/unit/test_bpf_abi.py parses common.h and checks these agree with it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

ABI_VERSION = 1


class Kind(enum.IntEnum):
    THREAD_SPAWN = 1
    TASK_EXIT = 2
    EXEC = 3
    CONN_OPEN = 4
    CONN_CLOSE = 5
    HTTP = 6
    GO_SPAWN = 7


# struct weft_hdr: ts_ns, cgroup_id, pid, tid, kind, version, reserved.
HEADER = struct.Struct("<QQIIHHI")


class AbiError(ValueError):
    """A record the decoder cannot read (short, unknown kind, or newer ABI version)."""


@dataclass(frozen=True, slots=True)
class Header:
    ts_ns: int
    cgroup_id: int
    pid: int
    tid: int
    kind: int


def read_header(raw: bytes) -> Header:
    if len(raw) < HEADER.size:
        raise AbiError(f"record of {len(raw)} bytes is shorter than the {HEADER.size}-byte header")
    ts, cgroup, pid, tid, kind, version, _ = HEADER.unpack_from(raw, 0)
    if version != ABI_VERSION:
        raise AbiError(f"record ABI version {version}, this decoder reads {ABI_VERSION}")
    return Header(ts, cgroup, pid, tid, kind)


def cstr(raw: bytes, length: int | None = None) -> str:
    """A fixed-size C char field as text (up to the NUL or `length`)."""
    if length is not None:
        raw = raw[:length]
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "replace")
