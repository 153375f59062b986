"""Process information from /proc: what the kernel records leave out.

For a pid: executable base name, OTEL_SERVICE_NAME from its environment (only that variable is
kept; nothing else of the environment leaves this module), parent pid, start time as Unix ns,
cgroup v2 id. Results are cached in a bounded LRU; an exec or an exit drops the entry.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

from schemas import weft_events_pb2 as pb

_SERVICE_VAR = b"OTEL_SERVICE_NAME="
_MAX_ENVIRON = 1 << 20  # read at most this much of an environment
_TICKS = os.sysconf("SC_CLK_TCK")


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    except OSError:
        pass
    return Path("/sys/fs/cgroup")


def cgroup_id(path: str | Path, mount: Path | None = None) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in this cgroup: its inode number.
    `path` is absolute or relative to the cgroup v2 mount."""
    base = mount or cgroup2_mount()
    p = Path(path)
    full = p if p.is_absolute() and p.is_relative_to(base) else base / str(p).lstrip("/")
    return full.stat().st_ino


def _boot_unix_ns() -> int:
    # /proc/PID/stat starttime counts clock ticks since boot on CLOCK_BOOTTIME.
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def service_name_from_environ(data: bytes) -> str:
    for entry in data.split(b"\0"):
        if entry.startswith(_SERVICE_VAR):
            return entry[len(_SERVICE_VAR):].decode("utf-8", "replace")
    return ""


class ProcessInfoCache:
    def __init__(self, max_entries: int = 8192, proc: Path = Path("/proc")) -> None:
        self._max = max_entries
        self._proc = proc
        self._cache: OrderedDict[int, pb.ProcessInfo] = OrderedDict()
        self._mount = cgroup2_mount()
        self._boot_ns = _boot_unix_ns()
        self.misses = 0   # processes gone before they could be read

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pid: int) -> pb.ProcessInfo | None:
        """Cached info for pid, read from /proc on first use; None when the process is gone."""
        info = self._cache.get(pid)
        if info is not None:
            self._cache.move_to_end(pid)
            return info
        info = self.read(pid)
        if info is None:
            self.misses += 1
            return None
        self._cache[pid] = info
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return info

    def forget(self, pid: int) -> None:
        """After exec (new exe, maybe new service name) or exit (the pid may be reused)."""
        self._cache.pop(pid, None)

    def read(self, pid: int) -> pb.ProcessInfo | None:
        base = self._proc / str(pid)
        try:
            stat = (base / "stat").read_bytes()
        except OSError:
            return None
        # comm may hold spaces and parentheses: the fields start after the LAST ')'.
        close = stat.rfind(b")")
        comm = stat[stat.find(b"(") + 1:close].decode("utf-8", "replace")
        fields = stat[close + 2:].split()
        ppid, start_ticks = int(fields[1]), int(fields[19])
        try:
            exe = os.path.basename(os.readlink(base / "exe"))
        except OSError:
            exe = comm  # kernel threads, or a process exiting right now
        exe = exe.removesuffix(" (deleted)")
        service = ""
        try:
            with open(base / "environ", "rb") as fh:
                service = service_name_from_environ(fh.read(_MAX_ENVIRON))
        except OSError:
            pass
        return pb.ProcessInfo(pid=pid, ppid=ppid, exe=exe, service_name=service or exe,
                              cgroup_id=self._cgroup_of(base),
                              start_ns=self._boot_ns + start_ticks * 1_000_000_000 // _TICKS)

    def _cgroup_of(self, base: Path) -> int:
        try:
            for line in (base / "cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    return cgroup_id(line[3:], self._mount)
        except (OSError, ValueError):
            pass
        return 0
