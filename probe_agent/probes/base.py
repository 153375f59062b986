"""The contract between probes and the runner.

A probe *declares*: its eBPF source (`bpf/<stem>.bpf.c`, beside `common.h`), the `-D` constants
it compiles with, the ring buffers it fills and how to decode their records, its attach points,
and its kernel-side counters. The runner *acts*: it compiles `source` with `cflags(ctx)` in one
`bcc.BPF` per probe, calls `attach`, then `configure`, opens every ring in `rings` and polls them,
passing each raw record to `RingSpec.decode`, reads `stats_map` for overflow/loss counters, and on
shutdown calls `detach`. TRACEPOINT_PROBE programs attach themselves at load; `attach` is for
uprobes and anything else BCC does not auto-attach.

Kernel-side loss: a BPF ring buffer has no lost-sample callback, so every program counts failed
`bpf_ringbuf_output` calls (and full maps) in its per-CPU `stats_map`, indexed by `stat_names`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from probe_agent.btf import VMLINUX
from probe_agent.enrich import CgroupScope
from schemas import weft_events_pb2 as pb

if TYPE_CHECKING:
    from bcc import BPF

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"

Decoder = Callable[[bytes, int], list[pb.Event]]
"""decode(raw_record_bytes, ktime_to_unix_offset_ns) -> events (possibly none)."""


@dataclass(frozen=True)
class RingSpec:
    map_name: str
    decode: Decoder
    # Record kinds (schemas.records.Kind) that may leave the agent as the kernel wrote them
    # (schema v2 RawRecords, expanded by schemas.codec); the runner then reads only their
    # header. `decode` still serves the per-record paths (BCC's reader, `record_envelope` off).
    passthrough: frozenset[int] = frozenset()
    # Every record of this ring has this size (0: sizes vary): the runner then takes a span of
    # them by arithmetic and reads their headers as arrays, with no per-record Python.
    record_size: int = 0


@dataclass(frozen=True)
class ProbeContext:
    """What the runner knows at start-up; probes turn it into constants and filter-map contents."""

    self_pid: int  # the agent's own pid: its syscalls and its traffic are never traced
    cgroups: tuple[CgroupScope, ...] = ()  # cgroup v2 subtrees to trace; empty = all
    ktime_offset_ns: int = 0  # add to bpf_ktime_get_ns() to get Unix ns
    btf_path: str = VMLINUX
    ring_pages: int = 1024  # pages per ring buffer (power of two): 4 MiB with 4 KiB pages
    max_connections: int = 16384  # bound of per-connection maps (~1.6 KB each); overflow is counted
    max_tasks: int = 16384  # bound of per-thread in-flight syscall maps
    extra: dict[str, int] = field(default_factory=dict)  # forward-compatible knobs, -D NAME=value


class Probe(Protocol):
    name: str
    source: Path
    rings: Sequence[RingSpec]
    stats_map: str  # BPF_PERCPU_ARRAY(u64) of counters, indexed like stat_names
    stat_names: Sequence[str]
    # Optional attributes, looked up with getattr: `blind_stats` (a Sequence[str] of stat_names
    # counting records lost with no marker for the stitcher: the runner reads them every round
    # and publishes a BlindSpan when they grow), `on_process` and `forget` (hooks, see runner).

    def cflags(self, ctx: ProbeContext) -> list[str]:
        """Compiler flags: include path for common.h and -D constants (BTF offsets, limits)."""
        ...

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Attach what BCC does not attach by itself (uprobes, ...). Tracepoints need nothing."""
        ...

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        """After load and attach: fill filter maps (the --cgroup roots, own pid)."""
        ...

    def detach(self, bpf: BPF) -> None:
        """Undo `attach`. The runner then calls bpf.cleanup() for the rest."""
        ...


LOW_VOLUME_RING_SHARE = 4  # lineage and goroutine rings: a quarter of the HTTP ring


def common_cflags(ctx: ProbeContext, ring_share: int = 1) -> list[str]:
    """Flags every program needs: common.h on the include path, the shared limits, the filters.
    `ring_share` divides `ctx.ring_pages` for a probe whose ring fills slowly: the agent maps
    every ring (twice over, see probe_agent.ringbuf), so its size shows in the agent's RSS."""
    flags = [
        f"-I{BPF_DIR}",
        f"-DWEFT_RING_PAGES={max(1, ctx.ring_pages // ring_share)}",
        f"-DWEFT_MAX_CONNS={ctx.max_connections}",
        f"-DWEFT_MAX_TASKS={ctx.max_tasks}",
        f"-DWEFT_SELF_PID={ctx.self_pid}",
        f"-DWEFT_FILTER_CGROUPS={1 if ctx.cgroups else 0}",
        f"-DWEFT_CGROUP_SCOPES={max(len(ctx.cgroups), 1)}",
    ]
    flags += [f"-D{name}={value}" for name, value in sorted(ctx.extra.items())]
    return flags


def fill_cgroup_filter(bpf: BPF, ctx: ProbeContext, map_name: str = "cgroup_scope") -> None:
    """Put the traced cgroup subtrees' roots in the program's scope array (consulted only when
    ctx.cgroups is not empty)."""
    table = bpf[map_name.encode()]
    # Entry 0 last: the programs run (and skip every task) from attach on, and cache a
    # verdict per cgroup only once entry 0 is set, so none is decided on a partial list.
    for index, scope in reversed(list(enumerate(ctx.cgroups))):
        table[ctypes.c_int(index)] = table.Leaf(scope.id, scope.level, 0)


def read_stats(bpf: BPF, probe: Probe) -> dict[str, int]:
    """Sum the probe's per-CPU counters: {stat_name: total}."""
    table = bpf[probe.stats_map.encode()]
    out: dict[str, int] = {}
    for index, name in enumerate(probe.stat_names):
        out[name] = int(table.sum(ctypes.c_int(index)).value)
    return out
