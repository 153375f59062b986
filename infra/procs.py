"""Daemon processes under one run directory: start with a pid file and a log, find, stop by pid.

A pid file is JSON: the pid, the exact argv it was started with, the process start time (in
clock ticks since boot, from /proc/<pid>/stat) and service facts such as the port. A pid file is
trusted only while that pid is alive, not a zombie, has the same start time and the same
cmdline, so a stale file whose pid the kernel has since reused is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class InfraError(RuntimeError):
    """A local service could not be started, found or stopped; the message says what to do."""


@dataclass(frozen=True)
class Daemon:
    """A service process this run directory knows about."""

    name: str
    pid: int
    argv: tuple[str, ...]
    start_ticks: int
    pid_file: Path
    log_file: Path
    facts: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"port": 19092}
    stop_signal: int = signal.SIGTERM  # the signal that makes this program exit promptly


def pid_file_of(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def log_file_of(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks_of(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    rest = _stat_fields(pid)
    return int(rest[19]) if rest else None


def cmdline_of(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


# Daemons started by this process: kept so their exit status is collected (no zombie, no
# "still running" ResourceWarning), and only theirs: other children belong to their own Popen.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        del _CHILDREN[pid]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (daemons we started are reaped here)."""
    _reap(pid)
    rest = _stat_fields(pid)
    return rest is not None and rest[0] not in ("Z", "X")


def _write_pid_file(daemon: Daemon) -> None:
    record = {"pid": daemon.pid, "argv": list(daemon.argv), "start_ticks": daemon.start_ticks,
              "log": str(daemon.log_file), "facts": dict(daemon.facts),
              "stop_signal": int(daemon.stop_signal)}
    tmp = daemon.pid_file.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(daemon.pid_file)  # atomic: a reader never sees half a pid file


def read_pid_file(run_dir: Path, name: str) -> Daemon | None:
    """The daemon a pid file records, trusted or not; None if there is no readable pid file."""
    path = pid_file_of(run_dir, name)
    try:
        record = json.loads(path.read_text())
        return Daemon(name=name, pid=int(record["pid"]), argv=tuple(record["argv"]),
                      start_ticks=int(record["start_ticks"]), pid_file=path,
                      log_file=Path(record["log"]), facts=dict(record.get("facts", {})),
                      stop_signal=int(record.get("stop_signal", signal.SIGTERM)))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable pid file %s: %s", path, exc)
        return None


def is_running(daemon: Daemon) -> bool:
    """The recorded pid is alive and is still the very process we started."""
    return (pid_alive(daemon.pid) and start_ticks_of(daemon.pid) == daemon.start_ticks
            and cmdline_of(daemon.pid) == daemon.argv)


def find_daemon(run_dir: Path, name: str) -> Daemon | None:
    """The running daemon `name` of this run directory, or None (a stale pid file is ignored)."""
    daemon = read_pid_file(run_dir, name)
    if daemon is None:
        return None
    if not is_running(daemon):
        logger.info("stale pid file %s (pid %d is gone or is another process)",
                    daemon.pid_file, daemon.pid)
        return None
    return daemon


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start_daemon(run_dir: Path, name: str, argv: list[str], *, facts: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> Daemon:
    """Start `argv` detached (own session, stdin from /dev/null, output to <name>.log) and write
    <name>.pid. The caller checks health; see `wait_until`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file_of(run_dir, name)
    with open(log_file, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=run_dir, env=None if env is None else dict(env),
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    ticks = start_ticks_of(proc.pid)
    if ticks is None:
        proc.wait()
        raise InfraError(f"{name} exited at once (code {proc.returncode}); log {log_file}:\n"
                         f"{tail(log_file)}")
    daemon = Daemon(name=name, pid=proc.pid, argv=tuple(argv), start_ticks=ticks,
                    pid_file=pid_file_of(run_dir, name), log_file=log_file, facts=dict(facts or {}),
                    stop_signal=stop_signal)
    _write_pid_file(daemon)
    logger.info("started %s pid %d (log %s)", name, proc.pid, log_file)
    return daemon


def wait_until(daemon: Daemon, healthy: Callable[[], bool], *, timeout_s: float) -> None:
    """Poll `healthy` until it answers True; raise InfraError (with the log tail) when the
    process dies or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if not pid_alive(daemon.pid):
            raise InfraError(f"{daemon.name} (pid {daemon.pid}) exited during start-up; "
                             f"log {daemon.log_file}:\n{tail(daemon.log_file)}")
        if healthy():
            return
        if time.monotonic() > deadline:
            raise InfraError(f"{daemon.name} (pid {daemon.pid}) not healthy after {timeout_s:.0f} s; "
                             f"log {daemon.log_file}:\n{tail(daemon.log_file)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def stop_pid(pid: int, *, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> bool:
    """Send `sig` (SIGTERM) to `pid`, wait up to `grace_s`, then SIGKILL. True if it had to be killed."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def stop_daemon(daemon: Daemon, *, grace_s: float = 5.0) -> bool:
    """Stop exactly this daemon (only if its pid is still the process we started) and remove
    its pid file. True if a process was stopped."""
    stopped = False
    if is_running(daemon):
        killed = stop_pid(daemon.pid, grace_s=grace_s, sig=daemon.stop_signal)
        logger.info("stopped %s pid %d%s", daemon.name, daemon.pid, " (SIGKILL)" if killed else "")
        stopped = True
    current = read_pid_file(daemon.pid_file.parent, daemon.name)
    if current is not None and current.pid == daemon.pid:
        daemon.pid_file.unlink(missing_ok=True)
    return stopped


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Reachability(NamedTuple):
    """Whether a service answered; `listening` tells a service that is not there (start it,
    or point Weft at one that is) from one that is there and refused us (fix the settings)."""

    ok: bool
    detail: str
    listening: bool
    warning: str = ""   # answered, but is set up in a way that costs Weft data (one sentence)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
