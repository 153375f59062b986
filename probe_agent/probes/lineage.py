"""Loader for bpf/lineage.bpf.c: thread/process spawn, exit and exec events."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from probe_agent.btf import member_offset
from probe_agent.probes.abi import HEADER, AbiError, Kind, cstr, read_header
from probe_agent.probes.base import (
    BPF_DIR,
    LOW_VOLUME_RING_SHARE,
    ProbeContext,
    RingSpec,
    common_cflags,
    fill_cgroup_filter,
)
from schemas import weft_events_pb2 as pb

if TYPE_CHECKING:
    from bcc import BPF

SPAWN = struct.Struct("<II")  # child_pid, child_tid
EXEC_FIXED = struct.Struct("<QII")  # start_ns, ppid, filename_len
FILENAME_MAX = 128
SPAWN_SIZE = HEADER.size + SPAWN.size
EXIT_SIZE = HEADER.size
EXEC_SIZE = HEADER.size + EXEC_FIXED.size + FILENAME_MAX


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    h = read_header(raw)
    ts = h.ts_ns + ktime_offset_ns
    if h.kind == Kind.THREAD_SPAWN:
        child_pid, child_tid = SPAWN.unpack_from(raw, HEADER.size)
        spawn = pb.ThreadSpawn(
            ts_ns=ts,
            parent_pid=h.pid,
            parent_tid=h.tid,
            child_pid=child_pid,
            child_tid=child_tid,
            new_process=child_pid != h.pid,
        )
        return [pb.Event(thread_spawn=spawn)]
    if h.kind == Kind.TASK_EXIT:
        return [pb.Event(task_exit=pb.TaskExit(ts_ns=ts, pid=h.pid, tid=h.tid))]
    if h.kind == Kind.EXEC:
        start_ns, ppid, name_len = EXEC_FIXED.unpack_from(raw, HEADER.size)
        off = HEADER.size + EXEC_FIXED.size
        exe = os.path.basename(cstr(raw[off : off + FILENAME_MAX], name_len))
        info = pb.ProcessInfo(
            ts_ns=ts,
            pid=h.pid,
            ppid=ppid,
            exe=exe,
            service_name=exe,
            cgroup_id=h.cgroup_id,
            start_ns=start_ns + ktime_offset_ns if start_ns else 0,
        )
        return [pb.Event(process=info)]
    raise AbiError(f"lineage ring carried a record of kind {h.kind}")


class LineageProbe:
    """clone/exit/exec lineage. service_name is the exe here; enrichment may set OTEL_SERVICE_NAME."""

    name = "lineage"
    source: Path = BPF_DIR / "lineage.bpf.c"
    rings: Sequence[RingSpec] = (RingSpec("lineage_events", decode),)
    stats_map = "stats"
    stat_names: Sequence[str] = ("ring_full",)

    def cflags(self, ctx: ProbeContext) -> list[str]:
        def off(struct_name: str, member: str) -> int:
            return member_offset(struct_name, member, ctx.btf_path)

        return [
            *common_cflags(ctx, LOW_VOLUME_RING_SHARE),  # a spawn storm still fits ~10k records
            f"-DWEFT_TASK_TGID_OFF={off('task_struct', 'tgid')}",
            f"-DWEFT_TASK_PID_OFF={off('task_struct', 'pid')}",
            f"-DWEFT_TASK_REAL_PARENT_OFF={off('task_struct', 'real_parent')}",
            f"-DWEFT_TASK_START_TIME_OFF={off('task_struct', 'start_time')}",
        ]

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Nothing: the tracepoint and raw-tracepoint programs attach at load."""

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        fill_cgroup_filter(bpf, ctx)

    def detach(self, bpf: BPF) -> None:
        """Nothing beyond bpf.cleanup()."""
