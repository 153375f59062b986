"""Python side of bpf/common.h: record kinds, the shared header, and the ABI version.

The layouts and decoders live in schemas/records.py (the stitcher's codec reads the same
records); this module keeps the names the probes and tests/unit/test_bpf_abi.py use.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.records import ABI_VERSION, HEADER, AbiError, Kind, cstr

__all__ = ["ABI_VERSION", "HEADER", "AbiError", "Header", "Kind", "cstr", "read_header"]


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
