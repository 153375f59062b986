"""Loader for bpf/inject.bpf.c: traceparent injection, form (b) (sock_ops + sk_msg).

Load order matters: this probe owns the context maps (weft_ctx, weft_ctx_ref, weft_inj_out,
exported with BPF_TABLE_PUBLIC), which the http tracer and the lineage probe declare "extern"
when compiled with -DWEFT_INJECT=1, so the runner loads it first. The sock_ops program goes on
the cgroup v2 root (or each traced cgroup) with BPF_F_ALLOW_MULTI, never displacing another
program; `detach` takes it off again, so nothing of ours stays attached after the agent exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probe_agent.probes.base import BPF_DIR, ProbeContext, RingSpec, common_cflags
from schemas import weft_events_pb2 as pb
from weft.sampling import TraceSampler

if TYPE_CHECKING:
    from bcc import BPF

logger = logging.getLogger(__name__)

SCAN_MAX = 1024  # bytes of each message the injector follows (power of two)
WINDOW = 128  # bytes per scanner run (SCAN_MAX / WINDOW tail calls)
INJECT_FLAG = "WEFT_INJECT"  # -D flag that makes the other probes use the shared context maps
_BPF_F_ALLOW_MULTI = 2


class InjectProbe:
    """sock_ops fills a SOCKHASH with client sockets; sk_msg inserts the traceparent line."""

    name = "inject"
    source: Path = BPF_DIR / "inject.bpf.c"
    rings: Sequence[RingSpec] = ()
    stats_map = "stats"
    stat_names: Sequence[str] = ("injected", "had_traceparent", "root", "go", "gave_up", "push_failed",
                                 "socks_full", "ambiguous", "fast_path")

    def __init__(self, cgroup_paths: Sequence[str] = (), sampler: TraceSampler | None = None) -> None:
        self.cgroup_paths = tuple(cgroup_paths)
        self.sampler = sampler or TraceSampler()   # the flags of the traceparent it writes
        self._attached: list[tuple[Any, int, int]] = []  # (function, fd, attach type)
        self._cgroup_fds: list[int] = []
        self._bpf: Any = None

    def cflags(self, ctx: ProbeContext) -> list[str]:
        flags = [*common_cflags(ctx), f"-DWEFT_INJ_SCAN={SCAN_MAX}", f"-DWEFT_INJ_WINDOW={WINDOW}"]
        if not self.sampler.keeps_every_root:
            flags.append(f"-DWEFT_SAMPLE_BOUND={self.sampler.bound}ULL")
        if self.sampler.parent_based:
            flags.append("-DWEFT_SAMPLE_PARENT=1")
        return flags

    def attach(self, bpf: BPF, ctx: ProbeContext) -> None:
        from bcc import BPF as _BPF
        from bcc import BPFAttachType
        from bcc.libbcc import lib

        from probe_agent.kernel import cgroup2_root

        scanner = bpf.load_func(b"weft_msg_scan", _BPF.SK_MSG)
        bpf[b"scanners"][ctypes.c_int(0)] = ctypes.c_int(scanner.fd)
        verdict = bpf.load_func(b"weft_sk_msg", _BPF.SK_MSG)
        map_fd = lib.bpf_table_fd(bpf.module, b"socks")  # BCC's wrapper does not know SOCKHASH
        if map_fd < 0:
            raise RuntimeError("the SOCKHASH map was not created")
        _BPF.attach_func(verdict, map_fd, BPFAttachType.SK_MSG_VERDICT)
        self._attached.append((verdict, map_fd, BPFAttachType.SK_MSG_VERDICT))
        sock_ops = bpf.load_func(b"weft_sock_ops", _BPF.SOCK_OPS)
        paths = self.cgroup_paths
        if not paths:
            root = cgroup2_root()
            if root is None:
                raise RuntimeError("no cgroup v2 mount: sock_ops programs attach to a cgroup v2")
            paths = (str(root),)
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            self._cgroup_fds.append(fd)
            _BPF.attach_func(sock_ops, fd, BPFAttachType.CGROUP_SOCK_OPS, _BPF_F_ALLOW_MULTI)
            self._attached.append((sock_ops, fd, BPFAttachType.CGROUP_SOCK_OPS))
            logger.info("header injection: sock_ops attached to %s", path)

    def configure(self, bpf: BPF, ctx: ProbeContext) -> None:
        """Go processes are added as the runner learns of them (on_process)."""
        self._bpf = bpf

    def on_process(self, info: pb.ProcessInfo) -> None:
        """A Go process never gets a thread-keyed context: keep it out of injection."""
        if info.runtime == "go" and self._bpf is not None:
            self._bpf[b"go_pids"][ctypes.c_uint32(info.pid)] = ctypes.c_uint8(1)

    def forget(self, pid: int) -> None:
        if self._bpf is not None:
            with contextlib.suppress(KeyError):
                del self._bpf[b"go_pids"][ctypes.c_uint32(pid)]

    def detach(self, bpf: BPF) -> None:
        from bcc import BPF as _BPF

        while self._attached:
            fn, fd, attach_type = self._attached.pop()
            try:
                _BPF.detach_func(fn, fd, attach_type)
            except Exception as exc:
                logger.warning("header injection: detach failed: %s", exc)
        while self._cgroup_fds:
            os.close(self._cgroup_fds.pop())
        self._bpf = None
