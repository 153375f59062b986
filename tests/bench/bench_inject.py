"""Cost of traceparent injection (form (b), sock_ops + sk_msg), side by side in one run (issue 6).

nginx serves a static file; wrk (a C client, so every request is injected) drives it over
keep-alive connections. Both run in a private cgroup v2 child, so both ends are traced as in a
deployment: the client side pays for the injection, the server side for reading the extra header
and assigning its request a context. The agent (the real `weft agent`, capture mode, `--cgroup`
that child) runs alternately without and with `--inject-headers`, same duration
each, so the ratio isolates injection from the rest of the agent's cost. Each (without, with)
pair gives a ratio and the median of the pairs is reported: on a shared machine a burst of
other work lands in one run, and the median keeps that one pair from deciding the figure.

  inject.ratio     throughput with injection ÷ without (agent running in both), median of pairs
  inject.share     client requests of the last injected run whose record carries the injected
                   traceparent ÷ all client requests recorded (1.0: every request injected)
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from schemas import weft_events_pb2 as pb
from schemas.codec import read_capture
from tests.bench.context import BenchContext
from tests.workloads.servers import ROOT, running

WEFT = Path(sys.executable).with_name("weft")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


class Agent:
    def __init__(self, capture: Path, cgroup: Path, inject: bool) -> None:
        argv = [str(WEFT), "agent", "--node", "bench-inject", "--capture", str(capture),
                "--cgroup", str(cgroup)]
        self.capture = capture
        self.proc = subprocess.Popen(argv + (["--inject-headers"] if inject else []), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:
            if line.startswith("weft agent"):
                return
            seen.append(line)
        self.proc.kill()
        raise RuntimeError(f"agent did not start: {''.join(seen)[-500:]!r}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def move_tree(pid: int, cgroup: Path) -> None:
    """`pid` and its children (nginx's master and workers) into `cgroup`."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in (pid, *map(int, children)):
        (cgroup / "cgroup.procs").write_text(str(p))


def wrk_in(cgroup: Path, url: str, seconds: float) -> float:
    cmd = f'echo $$ > {cgroup}/cgroup.procs && exec wrk -t2 -c8 -d{seconds:g}s {url}'
    out = subprocess.run(["sh", "-c", cmd], check=True, capture_output=True, text=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]


def injected_share(capture: Path) -> float:
    clients = injected = 0
    for frame in read_capture(capture):
        for ev in frame.events:
            if ev.WhichOneof("kind") == "http" and ev.http.role == pb.ROLE_CLIENT:
                clients += 1
                injected += bool(ev.http.injected_traceparent)
    return injected / clients if clients else 0.0


def run(ctx: BenchContext) -> dict[str, float]:
    seconds = 2.0 if ctx.quick else 5.0
    rounds = 3  # alternated (without, with) pairs: this machine is shared, one pair is too noisy
    work = Path(tempfile.mkdtemp(prefix="weft-bench-inject-"))
    cgroup = CGROUP_ROOT / f"weft-bench-inject-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cgroup.mkdir()
    off: list[float] = []
    on: list[float] = []
    last = work / "none"
    try:
        with running("nginx", work) as srv:
            move_tree(srv.proc.pid, cgroup)
            url = srv.url("/index.html")
            wrk_in(cgroup, url, 1)  # warm-up
            for round_ in range(rounds):
                for inject, sink in ((False, off), (True, on)):
                    last = work / f"{round_}-{'on' if inject else 'off'}.wcap"
                    agent = Agent(last, cgroup, inject)
                    try:
                        sink.append(wrk_in(cgroup, url, seconds))
                    finally:
                        agent.stop()
    finally:
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    pairs = sorted(w / wo for wo, w in zip(off, on, strict=True))
    ratio = statistics.median(pairs)
    share = injected_share(last)
    ctx.console.print(f"inject: without {off} with {on} req/s → pair ratios "
                      f"{[round(p, 3) for p in pairs]}, median {ratio:.3f}; injected share {share:.3f}")
    return {"inject.ratio": ratio, "inject.share": share}
