"""Loader for bpf/lineage.bpf.c: thread/process spawn, exit and exec events."""

from __future__ import annotations

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
from schemas.records import EXEC_FIXED, EXEC_SIZE, EXIT_SIZE, FILENAME_MAX, Kind

if TYPE_CHECKING:
    from bcc import BPF

__all__ = ["EXEC_FIXED", "EXEC_SIZE", "EXIT_SIZE", "FILENAME_MAX", "SPAWN", "SPAWN_SIZE",
           "LineageProbe", "decode"]

SPAWN = records.THREAD_SPAWN_BODY  # child_pid, child_tid
SPAWN_SIZE = records.THREAD_SPAWN_SIZE
RING_KINDS = frozenset({Kind.THREAD_SPAWN, Kind.TASK_EXIT, Kind.EXEC})


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    """One record of the lineage ring (see schemas/records.py). Decoded by the agent, not
    passed through: it acts on execs and exits, and the ring is quiet."""
    return records.decode(raw, ktime_offset_ns, RING_KINDS)


class LineageProbe:
    """clone/exit/exec lineage. service_name is the exe here; enrichment may set OTEL_SERVICE_NAME."""

    name = "lineage"
    source: Path = BPF_DIR / "lineage.bpf.c"
    rings: Sequence[RingSpec] = (RingSpec("lineage_events", decode),)
    stats_map = "stats"
    # No blind_stats: a lost spawn record leaves the new thread's calls unlinked (no parent
    # found), never wrongly linked; a tid reused with its new spawn record seen starts a new
    # incarnation whatever happened to the old one's exit. Only losing both records of one tid
    # could mislead the stitcher, and declining every link of the node for max_request_s at each
    # lost lineage record (one now and then even with the agent on time) would cost far more.
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
