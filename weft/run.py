"""`weft run`: the main job on this machine — broker, Redis, this host's agent and the stitcher —
and the child-process helpers `weft demo` and the end-to-end tests share.

    weft run                 # until Ctrl-C / SIGTERM; then stops exactly what it started

Traces go to OTEL_EXPORTER_OTLP_ENDPOINT when it is set (the stitcher's OTLP exporter reads the
standard OTEL_EXPORTER_OTLP_* variables), else to run_dir()/traces.jsonl as OTLP JSON lines
(`weft stitch --out`), which `weft show --last 10` reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

logger = logging.getLogger(__name__)

WEFT = str(Path(sys.executable).parent / "weft")
_AGENT_READY = re.compile(r"^weft agent (?P<node>\S+): ", re.M)
_STITCH_ASSIGNED = re.compile(r"weft-stitch pid \d+ assigned \S+ partitions \[([\d, ]*)\]")


class PipelineError(RuntimeError):
    """A Weft component we started did not come up; the message carries the end of its log."""


@dataclass
class Child:
    """A Weft process this program started, with its log file; stopped by pid only."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    _fh: IO[bytes] = field(repr=False)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float, what: str) -> re.Match[str]:
        """Poll the log until `pattern` appears; raise when the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = pattern.search(self.text())
            if found:
                return found
            if not self.alive():
                raise PipelineError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                                    f"{self.tail()}")
            if time.monotonic() > deadline:
                raise PipelineError(f"{self.name} not {what} after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the agent and the stitcher flush on it), SIGKILL after timeout_s."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", self.name,
                               self.proc.pid, timeout_s)
                self.proc.kill()
                self.proc.wait(10)
        if not self._fh.closed:
            self._fh.close()
        return self.proc.returncode


def spawn(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - closed by Child.stop
    # Own session: a Ctrl-C in the terminal reaches us only, and we stop children in order.
    proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                            start_new_session=True)
    logger.info("started %s pid %d (log %s)", name, proc.pid, log)
    return Child(name, proc, log, fh)


def spawn_agent(node: str, log_dir: Path, *, cgroups: Sequence[str | Path] = (), bootstrap: str = "",
                capture: Path | None = None, env: dict[str, str] | None = None) -> Child:
    """`weft agent --node NODE` (filtered by cgroups) to Kafka or a capture file; see wait_agents."""
    argv = [WEFT, "-v", "agent", "--node", node]
    for cgroup in cgroups:
        argv += ["--cgroup", str(cgroup)]
    argv += ["--capture", str(capture)] if capture is not None else ["--kafka", bootstrap]
    return spawn(f"agent {node}", argv, log_dir / f"agent-{node}.log", env)


def wait_agents(agents: Sequence[Child], timeout_s: float = 240.0) -> None:
    """Until every agent printed its start line (BPF compiled and attached: BCC takes a while,
    so agents are spawned together and waited for together)."""
    deadline = time.monotonic() + timeout_s
    for agent in agents:
        agent.wait_for(_AGENT_READY, max(1.0, deadline - time.monotonic()), "tracing")


@dataclass(frozen=True)
class StitchTarget:
    """Where a stitcher reads and keeps its state; names keep one run apart from any other."""

    bootstrap: str
    redis_url: str
    topic: str
    group: str
    namespace: str = ""


def start_stitcher(target: StitchTarget, log_dir: Path, *, out: Path | None, expect_nodes: Sequence[str] = (),
                   env: dict[str, str] | None = None, session_timeout_s: float = 10.0,
                   timeout_s: float = 90.0) -> Child:
    """`weft stitch`, writing OTLP JSON lines to `out` (None: export over OTLP per the
    OTEL_EXPORTER_OTLP_* variables); ready once it was assigned partitions."""
    argv = [WEFT, "-v", "stitch", "--bootstrap", target.bootstrap, "--topic", target.topic,
            "--redis-url", target.redis_url, "--group", target.group,
            "--session-timeout", str(session_timeout_s)]
    if target.namespace:
        argv += ["--namespace", target.namespace]
    for node in expect_nodes:
        argv += ["--expect-node", node]
    if out is not None:
        argv += ["--out", str(out)]
    child = spawn("stitcher", argv, log_dir / "stitch.log", env)
    try:
        child.wait_for(_STITCH_ASSIGNED, timeout_s, "assigned partitions")
    except BaseException:
        child.stop(10)
        raise
    return child


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[list[Child]]:
    """Stop every child on the way out, last started first."""
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: leave the main loop and tear down."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into StopRequested in the main thread while inside."""
    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise StopRequested

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_main(*, run_path: Path, partitions: int = 4) -> int:
    """`weft run`: start everything, wait for a signal, stop what was started."""
    from infra.services import LocalInfra

    node = socket.gethostname()
    otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    out = None if otlp_endpoint else run_path / "traces.jsonl"
    logs = run_path / "logs"
    env = {**os.environ, "WEFT_RUN_DIR": str(run_path)}
    infra: LocalInfra | None = None
    children: list[Child] = []
    try:
        with stop_on_signals():
            infra = LocalInfra.start(run_path, partitions=partitions)
            kafka = infra.kafka_settings()
            target = StitchTarget(infra.bootstrap, infra.redis_url, kafka.raw_topic, "weft-stitch")
            print(f"broker {infra.bootstrap}, redis {infra.redis_url}; starting the stitcher and the agent "
                  f"for {node} (logs in {logs})", flush=True)
            children.append(start_stitcher(target, logs, out=out, expect_nodes=[node], env=env))
            children.append(spawn_agent(node, logs, bootstrap=infra.bootstrap, env=env))
            wait_agents(children[-1:])
            where = f"OTLP endpoint {otlp_endpoint}" if out is None else f"{out}"
            print(f"weft is tracing this host ({node}); traces go to {where}.", flush=True)
            if out is not None:
                print(f"Look at them with: weft show --last 10 --file {out}", flush=True)
            print("Ctrl-C stops it.", flush=True)
            while all(c.alive() for c in children):
                time.sleep(0.5)
            dead = next(c for c in children if not c.alive())
            print(f"{dead.name} exited ({dead.proc.returncode}); stopping:\n{dead.tail()}", file=sys.stderr)
            return 1
    except StopRequested:
        print("stopping", flush=True)
        return 0
    except PipelineError as exc:
        print(f"weft run: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        if infra is not None:
            infra.stop()
