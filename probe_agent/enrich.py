"""Process information from /proc: what the kernel records leave out.

For a pid: executable base name, its own resource (`probe_agent.resource`: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES from its environment — only those two variables are read; nothing else
of the environment leaves this module — and container.id / k8s.pod.uid from its cgroup path),
parent pid, start time as Unix ns, cgroup v2 id, and the runtime: "go" when the executable is a
Go binary (it has one of the ELF sections only Go's linker writes: `.go.buildinfo`, which every
Go toolchain since 1.13 writes, stripped or not, and which some release builds remove
afterwards; the function table `.gopclntab`, which the Go runtime itself needs; the
`.note.go.buildid` note). A Go process taken for a threaded one would get thread-based links
and injected contexts, both wrong for goroutines that move between threads. Results are cached
in a bounded LRU; an exec or an exit drops the entry. The runtime is cached per executable file
((device, inode, mtime, size) of /proc/PID/exe), also bounded, so a hundred processes of one binary
cost one ELF read.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probe_agent.resource import resource_of
from schemas import weft_events_pb2 as pb

logger = logging.getLogger(__name__)
_MAX_ENVIRON = 1 << 20  # read at most this much of an environment
_MAX_WARNED = 256       # distinct warnings about malformed OTEL_RESOURCE_ATTRIBUTES
_TICKS = os.sysconf("SC_CLK_TCK")
_GO_SECTIONS = (".go.buildinfo", ".gopclntab", ".data.rel.ro.gopclntab", ".note.go.buildid")


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


def _cgroup_dir(path: str | Path, base: Path) -> Path:
    """A cgroup given absolute or relative to the cgroup v2 mount `base`, as a full path."""
    p = Path(path)
    return p if p.is_absolute() and p.is_relative_to(base) else base / str(p).lstrip("/")


def cgroup_id(path: str | Path, mount: Path | None = None) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in this cgroup: its inode number.
    `path` is absolute or relative to the cgroup v2 mount."""
    return _cgroup_dir(path, mount or cgroup2_mount()).stat().st_ino


def cgroup_path_of(proc_dir: Path) -> str:
    """A process's cgroup v2 path from /proc/PID/cgroup (relative to the reader's cgroup
    namespace), or "" when unreadable."""
    try:
        for line in (proc_dir / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


class CgroupScope(NamedTuple):
    """A cgroup v2 directory traced with its whole subtree (cgroups created later included)."""

    id: int       # what bpf_get_current_cgroup_id() returns for tasks in it: the inode number
    level: int    # depth below the cgroup v2 root (0: the root itself)
    path: str     # relative to the cgroup v2 mount, "/a/b" ("/" for the root)

    def holds(self, cgroup_path: str) -> bool:
        """Whether a task whose /proc/PID/cgroup v2 path is `cgroup_path` is in this subtree."""
        return self.path == "/" or cgroup_path == self.path or cgroup_path.startswith(self.path + "/")


def cgroup_scope(path: str | Path, mount: Path | None = None) -> CgroupScope:
    """The scope of a --cgroup argument (absolute, or relative to the cgroup v2 mount); raises
    OSError when the directory does not exist."""
    base = mount or cgroup2_mount()
    full = _cgroup_dir(path, base)
    rel = full.resolve().relative_to(base.resolve())
    return CgroupScope(full.stat().st_ino, len(rel.parts), "/" + rel.as_posix() if rel.parts else "/")


def _boot_unix_ns() -> int:
    # /proc/PID/stat starttime counts clock ticks since boot on CLOCK_BOOTTIME.
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def runtime_of_elf(fh: BinaryIO) -> str:
    """"go" for a Go executable (ELF with a section only Go's linker writes), else ""."""
    if fh.read(4) != b"\x7fELF":
        return ""
    fh.seek(0)
    try:
        elf = ELFFile(fh)
        return "go" if any(elf.get_section_by_name(name) is not None for name in _GO_SECTIONS) else ""
    except (ELFError, ValueError, EOFError, struct.error):
        return ""


class RuntimeCache:
    """The runtime of executable files, by (device, inode, mtime, size): bounded LRU."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._cache: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self.reads = 0   # ELF files actually parsed

    def __len__(self) -> int:
        return len(self._cache)

    def of(self, exe: str | Path) -> str:
        """Runtime of the file `exe` (e.g. /proc/PID/exe); "" when it cannot be read."""
        try:
            with open(exe, "rb") as fh:
                st = os.fstat(fh.fileno())
                key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                found = self._cache.get(key)
                if found is not None:
                    self._cache.move_to_end(key)
                    return found
                self.reads += 1
                runtime = runtime_of_elf(fh)
        except OSError:
            return ""
        self._cache[key] = runtime
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return runtime


class ProcessInfoCache:
    def __init__(self, max_entries: int = 8192, proc: Path = Path("/proc")) -> None:
        self._max = max_entries
        self._proc = proc
        self._cache: OrderedDict[int, pb.ProcessInfo] = OrderedDict()
        self._mount = cgroup2_mount()
        self._boot_ns = _boot_unix_ns()
        self.runtimes = RuntimeCache(max(16, min(max_entries, 1024)))
        self.misses = 0   # processes gone before they could be read
        self._warned: set[str] = set()   # malformed resource variables already logged

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
        fields = stat[close + 2:].split()
        ppid, start_ticks = int(fields[1]), int(fields[19])
        try:
            exe = os.path.basename(os.readlink(base / "exe"))
        except OSError:
            # A process exiting right now (a zombie: no exe, no environ) or a kernel thread:
            # what could be read would be wrong (comm for exe and service, no runtime), and
            # would override the right record announced earlier. Treat it as gone.
            return None
        exe = exe.removesuffix(" (deleted)")
        environ = b""
        try:
            with open(base / "environ", "rb") as fh:
                environ = fh.read(_MAX_ENVIRON)
        except OSError:
            pass
        cgroup_path = cgroup_path_of(base)
        resource = resource_of(environ, cgroup_path)
        if resource.problem:
            self._warn_once(pid, exe, resource.problem)
        info = pb.ProcessInfo(pid=pid, ppid=ppid, exe=exe, service_name=resource.service_name or exe,
                              cgroup_id=self._cgroup_id(cgroup_path),
                              start_ns=self._boot_ns + start_ticks * 1_000_000_000 // _TICKS,
                              runtime=self.runtimes.of(base / "exe"))
        info.resource_attributes.update(resource.attributes)
        return info

    def _warn_once(self, pid: int, exe: str, problem: str) -> None:
        """Log a malformed resource variable once: a service's replicas share their environment."""
        key = f"{exe}: {problem}"
        if key not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(key)
            logger.warning("process %d (%s): %s", pid, exe, problem)

    def _cgroup_id(self, cgroup_path: str) -> int:
        try:
            return cgroup_id(cgroup_path, self._mount) if cgroup_path else 0
        except (OSError, ValueError):
            return 0
