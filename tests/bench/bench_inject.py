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
  inject.sk_msg_ns CPU ns per run of the sk_msg verdict program (tail calls included: the kernel
                   counts a tail-called program's time in its caller's run), summed over the
                   injected runs from the kernel's bpf_stats: unlike req/s, not moved much by
                   other work on a shared machine
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
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


_SYS_BPF = 321  # x86_64
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


def enable_bpf_stats() -> int:
    """An fd that keeps the kernel's per-program run-time statistics on while it is open
    (BPF_ENABLE_STATS: counted per holder, so other users of kernel.bpf_stats_enabled are not
    disturbed); -1 when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(8)  # union bpf_attr { struct { __u32 type; } enable_stats }
    ctypes.c_uint32.from_buffer(attr).value = _BPF_STATS_RUN_TIME
    return int(libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, attr, ctypes.sizeof(attr)))


def prog_stats(pid: int) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the BPF programs process `pid` holds."""
    ids = set()
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("prog_id:"))
    out: dict[str, tuple[int, int]] = {}
    shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True,
                                      text=True).stdout)
    for prog in shown:
        if prog["id"] in ids:
            out[prog.get("name", "")] = (prog.get("run_time_ns", 0), prog.get("run_cnt", 0))
    return out


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
    work = Path(tempfile.mkdtemp(prefix="weft-bench-inject-"))
    try:
        return measure(ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nginx's files and six capture files, ~90 MB


def measure(ctx: BenchContext, work: Path) -> dict[str, float]:
    seconds = 2.0 if ctx.quick else 5.0
    rounds = 3  # alternated (without, with) pairs: this machine is shared, one pair is too noisy
    cgroup = CGROUP_ROOT / f"weft-bench-inject-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cgroup.mkdir()
    off: list[float] = []
    on: list[float] = []
    cost: dict[str, list[int]] = {}  # program name -> [run_time_ns, run_cnt] over the injected runs
    last = work / "none"
    stats_fd = enable_bpf_stats()
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
                        before = prog_stats(agent.proc.pid)
                        sink.append(wrk_in(cgroup, url, seconds))
                        if inject:
                            for name, (ns, cnt) in prog_stats(agent.proc.pid).items():
                                ns0, cnt0 = before.get(name, (0, 0))
                                acc = cost.setdefault(name, [0, 0])
                                acc[0] += ns - ns0
                                acc[1] += cnt - cnt0
                    finally:
                        agent.stop()
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
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
    per_run = {name: ns / cnt for name, (ns, cnt) in sorted(cost.items()) if cnt}
    requests = cost.get("weft_sk_msg", [0, 0])[1]
    every = sum(ns for ns, _ in cost.values()) / requests if requests else 0.0
    ctx.console.print("inject: bpf_stats ns/run over the injected runs: "
                      + ", ".join(f"{name} {v:.0f} ({cost[name][1]} runs)" for name, v in per_run.items()
                                  if name.startswith("weft_"))
                      + f"; all the agent's programs {every:.0f} ns per send")
    figures = {"inject.ratio": ratio, "inject.share": share}
    if "weft_sk_msg" in per_run:
        figures["inject.sk_msg_ns"] = per_run["weft_sk_msg"]
    return figures
