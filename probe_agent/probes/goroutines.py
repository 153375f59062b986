"""Loader for bpf/go_runtime.bpf.c: goroutine lineage and goroutine ids of Go HTTP requests.

Its uprobes are attached per Go executable, once per file, when the agent learns that a traced
process runs one (`on_process`, called by the runner with each ProcessInfo whose runtime is
"go", at exec or at the process's first event; Go processes already running at start are found
by `configure`). The process is then registered in `weft_go_procs` (pid -> offsets from the
binary's DWARF): from that moment its `go` statements give GoroutineSpawn events and the http
tracer puts goroutine ids on its requests. That work (~0.3 s for a new binary, ~1 ms for a
known one) runs in one worker thread, never in the poll loop. Goroutines created before the
registration have no spawn record: calls made from them stay unlinked (`weft.no_goroutine`
when they carry no goid; a root otherwise), never linked wrongly.

A Go binary without symbols or DWARF (`-ldflags=-s -w`) is reported once (log warning and the
`go_binary_unsupported` counter) and traced without goroutine ids (goid 0).

Needs bpf/http_tracer.bpf.c loaded first in the same process: it owns (BPF_TABLE_PUBLIC) the
two maps this program declares extern.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probe_agent.enrich import ProcessInfoCache, cgroup_path_of
from probe_agent.gobinary import (
    NEWPROC1,
    NEWPROC_FUNC1,
    PC_ROUNDTRIP,
    REQUEST_WRITE,
    FileKey,
    GoBinary,
    GoBinaryCache,
    GoBinaryError,
)
from probe_agent.probes.base import BPF_DIR, LOW_VOLUME_RING_SHARE, ProbeContext, RingSpec, common_cflags
from schemas import records
from schemas import weft_events_pb2 as pb
from schemas.records import Kind

if TYPE_CHECKING:
    from bcc import BPF

logger = logging.getLogger(__name__)

SPAWN = records.GO_SPAWN_BODY  # parent_goid, child_goid
SPAWN_SIZE = records.GO_SPAWN_SIZE  # 48, asserted in the C source
SPAWN_RECORD = records.GO_SPAWN_RECORD
_UNSUPPORTED_STAT = 5  # index of go_binary_unsupported in stat_names (written from user space)
RING_KINDS = frozenset({Kind.GO_SPAWN})


def decode(raw: bytes, ktime_offset_ns: int) -> list[pb.Event]:
    """One record of the go ring (see schemas/records.py)."""
    return records.decode(raw, ktime_offset_ns, RING_KINDS)


# (symbol, BPF function): uprobes at function entry, where the binary has the function.
_ENTRY_PROBES = ((PC_ROUNDTRIP, "go_pconn_roundtrip"), (REQUEST_WRITE, "go_request_write"))


class WeftGoProc(ctypes.Structure):
    """struct weft_go_proc of the two C sources."""

    _fields_ = (("goid_off", ctypes.c_uint64), ("stack_off", ctypes.c_uint64),
                ("m_off", ctypes.c_uint64), ("curg_off", ctypes.c_uint64),
                ("gopc_off", ctypes.c_uint64), ("skip_lo", ctypes.c_uint64), ("skip_hi", ctypes.c_uint64))


class GoroutineProbe:
    """`go` statements and the goroutine behind each Go HTTP request; see go_runtime.bpf.c."""

    name = "goroutines"
    source: Path = BPF_DIR / "go_runtime.bpf.c"
    rings: Sequence[RingSpec] = (RingSpec("go_events", decode, passthrough=RING_KINDS),)
    stats_map = "stats"
    stat_names: Sequence[str] = ("ring_full", "no_parent", "caller_found", "caller_missed",
                                 "spawn_skipped", "go_binary_unsupported")

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._binaries = GoBinaryCache()
        self._attached: set[FileKey] = set()
        self._registered: set[int] = set()
        self._unsupported = 0
        self._bpf: Any = None
        # Reading a new binary's DWARF takes ~0.3 s: the runner's hooks hand registrations to
        # this one worker so that the poll loop never waits; the lock orders direct callers.
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._go_pids: set[int] = set()  # handed to the worker (poll-loop side)

    # -- Probe contract ------------------------------------------------------------------

    def cflags(self, ctx: ProbeContext) -> list[str]:
        return common_cflags(ctx, LOW_VOLUME_RING_SHARE)  # 48-byte records, ~20k fit

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Load the programs now (uprobes go on each Go executable as it is found, from the
        worker thread, which then only makes attach syscalls)."""
        from bcc import BPF as _BPF

        for fn_name in ("go_newproc_runqput", "go_newproc1_ret", *(fn for _, fn in _ENTRY_PROBES)):
            bpf.load_func(fn_name.encode(), _BPF.KPROBE)

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Register the Go processes already running (in the traced cgroups, if any), in the
        worker thread."""
        self._bpf = bpf
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weft-go")
        self._submit(self._scan, ctx)

    def _scan(self, ctx: ProbeContext) -> None:
        procs = ProcessInfoCache(max_entries=64, proc=self._proc)
        for entry in self._proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == ctx.self_pid:
                continue
            pid = int(entry.name)
            if procs.runtimes.of(entry / "exe") != "go":
                continue
            if ctx.cgroups and not any(scope.holds(cgroup_path_of(entry)) for scope in ctx.cgroups):
                continue
            self.register(pid)

    def detach(self, bpf: BPF) -> None:
        """Stop the worker; the uprobes are detached by bpf.cleanup()."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
        self._registered.clear()

    # -- hooks called by the runner (poll loop): the work is done by the worker ------------

    def on_process(self, info: pb.ProcessInfo) -> None:
        if info.runtime == "go":
            self._go_pids.add(info.pid)
            self._submit(self.register, info.pid)

    def forget(self, pid: int) -> None:
        """The process exited or exec'd: its pid may be reused by anything."""
        if pid in self._go_pids or pid in self._registered:  # (found by the start-up scan)
            self._go_pids.discard(pid)
            self._submit(self.unregister, pid)

    def idle(self) -> None:
        """Wait until the registrations handed to the worker so far are done."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()

    # -- the work ----------------------------------------------------------------------------

    def unregister(self, pid: int) -> None:
        with self._lock:
            if pid in self._registered and self._bpf is not None:
                self._registered.discard(pid)
                with contextlib.suppress(KeyError):
                    del self._bpf[b"weft_go_procs"][ctypes.c_uint32(pid)]

    def register(self, pid: int) -> bool:
        """Trace this Go process at goroutine level; False when its binary does not allow it."""
        with self._lock:
            return self._register(pid)

    def _register(self, pid: int) -> bool:
        if self._bpf is None or pid in self._registered:
            return pid in self._registered
        exe = self._proc / str(pid) / "exe"
        try:
            key, found, fresh = self._binaries.get(exe)
        except OSError:
            return False  # gone already
        if isinstance(found, GoBinaryError):
            if fresh:
                self._unsupported += 1
                self._publish_unsupported()
                logger.warning("Go binary %s (pid %d) is traced without goroutine ids: %s",
                               _exe_name(exe), pid, found)
            return False
        if key not in self._attached:
            try:
                self._attach_binary(exe, found)
            except Exception as exc:
                logger.warning("cannot attach goroutine uprobes to %s (pid %d): %s", _exe_name(exe), pid, exc)
                return False
            self._attached.add(key)
        skip_lo, skip_hi = found.unreported_spawns(_mapped_at(self._proc / str(pid), exe)
                                                   if found.load_base is not None else 0)
        offsets = WeftGoProc(found.goid_offset, found.stack_offset, found.m_offset, found.curg_offset,
                             found.gopc_offset, skip_lo, skip_hi)
        self._bpf[b"weft_go_procs"][ctypes.c_uint32(pid)] = offsets
        self._registered.add(pid)
        logger.info("goroutine ids for pid %d (%s)", pid, _exe_name(exe))
        return True

    # -- internals -----------------------------------------------------------------------

    def _submit(self, fn: Callable[..., object], *args: Any) -> None:
        if self._worker is None:
            return

        def logged() -> None:
            try:
                fn(*args)
            except Exception as exc:  # the worker must keep going
                logger.warning("goroutine probe: %s%s failed: %s", fn.__name__, args, exc)

        self._worker.submit(logged)

    def _attach_binary(self, exe: Path, binary: GoBinary) -> None:
        path = os.fsencode(os.path.realpath(exe))

        def attach(symbol: str, offset: int, fn_name: str) -> None:
            # by address (BCC turns it into a file offset): a stripped binary has no symbol
            # table for BCC to look the name up in; the addresses come from gobinary either way
            self._bpf.attach_uprobe(name=path, addr=binary.functions[symbol][0] + offset,
                                    fn_name=fn_name.encode())

        for symbol, fn_name in _ENTRY_PROBES:
            if binary.has(symbol):
                attach(symbol, binary.entry_offsets.get(symbol, 0), fn_name)
        if binary.spawn_site is not None:
            attach(NEWPROC_FUNC1, binary.spawn_site, "go_newproc_runqput")
            spawn = f"CALL runqput in {NEWPROC_FUNC1}+{binary.spawn_site}"
        else:
            for offset in binary.newproc1_rets:
                attach(NEWPROC1, offset, "go_newproc1_ret")
            spawn = f"{len(binary.newproc1_rets)} RETs in {NEWPROC1} (slow: single-stepped)"
        logger.info("goroutine uprobes on %s (%s, %s: goid at +%d, spawns at %s, entries at %s)",
                    path.decode(errors="replace"), binary.go_version, binary.read_from, binary.goid_offset,
                    spawn, binary.entry_offsets)

    def _publish_unsupported(self) -> None:
        """Kept in the stats map so that it reaches the metrics like the kernel counters."""
        table = self._bpf[self.stats_map.encode()]
        values = table.Leaf()  # one u64 per possible CPU; CPU 0 holds the user-space count
        for i in range(len(values)):
            values[i] = self._unsupported if i == 0 else 0
        table[ctypes.c_int(_UNSUPPORTED_STAT)] = values


def _mapped_at(proc_dir: Path, exe: Path) -> int:
    """Where the process mapped file offset 0 of its executable (0 when not found): a PIE
    build's code runs at its link-time address plus that load bias."""
    try:
        target = os.path.realpath(exe)
        for line in (proc_dir / "maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and int(parts[2], 16) == 0 and parts[5] == target:
                return int(parts[0].split("-")[0], 16)
    except (OSError, ValueError):
        pass
    return 0


def _exe_name(exe: Path) -> str:
    try:
        return os.readlink(exe)
    except OSError:
        return str(exe)
