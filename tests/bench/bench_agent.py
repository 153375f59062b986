"""Probe-agent cost, measured side by side in one run (issue 3).

For each server (Go net/http, Python ThreadingHTTPServer, nginx static file) wrk drives one
keep-alive load with the agent detached, then attached, alternating (off, on, off, on), each run
the same duration; the ratio is mean(on) / mean(off). The agent is the real `weft agent`
(probes + runner, writing a capture file) in its own process, so its CPU and RSS are its own.
Each measured window starts once the agent has settled after its start (its one-time work, e.g.
reading the DWARF of running Go executables, is printed, not counted).

  agent.ratio.{go,python,nginx}  throughput with the agent ÷ without
  agent.p99_added_us             p99 latency at a fixed 2k req/s (tests/workloads/paced_client.py,
                                 a paced generator, since wrk2 is absent) with minus without
  agent.lost_20k                 requests wrk completed at full speed (≥ 20k/s on the Go server)
                                 minus server-side HTTP records the agent captured for them
  agent.rss_mb_1m                agent RSS (MB) at the end of the run (after all the requests
                                 above; the count is printed — short runs, not a full million)
  agent.cpu_s_per_10k            agent user+system CPU seconds per 10k traced requests
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schemas import weft_events_pb2 as pb
from schemas.codec import read_capture
from tests.bench.context import BenchContext
from tests.workloads.servers import ROOT, Server, running

WEFT = Path(sys.executable).with_name("weft")


class Agent:
    """`weft agent --capture` in its own process; ready once it prints its start line."""

    def __init__(self, capture: Path) -> None:
        self.capture = capture
        self.proc = subprocess.Popen(
            [str(WEFT), "agent", "--node", "bench", "--capture", str(capture), "--metrics-port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # compiler warnings may come first
            if line.startswith("weft agent"):
                break
            seen.append(line)
        else:
            self.proc.kill()
            raise RuntimeError(f"agent did not start: {''.join(seen)[-500:]!r}")
        self.start_cpu_s = self.settle()

    def settle(self, idle_share: float = 0.1, window_s: float = 0.3, limit_s: float = 20.0) -> float:
        """Wait for the one-time work after start (the goroutine probe reads the DWARF of every
        Go executable running, ~1 s of CPU per binary) to finish, so that the windows measured
        hold the per-request cost only. Returns the CPU seconds used since exec."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            before = self.cpu_s()
            time.sleep(window_s)
            if self.cpu_s() - before < idle_share * window_s:
                break
        return self.cpu_s()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text())
        return int(m[1]) / 1024 if m else 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def wrk(url: str, seconds: float, conns: int = 8) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{seconds:g}s", url], check=True, capture_output=True, text=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    n = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    return rps, n


def server_records(capture: Path, port: int) -> int:
    return sum(
        1
        for frame in read_capture(capture)
        for e in frame.events
        if e.HasField("http") and e.http.role == pb.ROLE_SERVER and e.http.tuple.local_port == port
    )


def paced_p99(srv: Server, seconds: float) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.workloads.paced_client",
            srv.host,
            str(srv.port),
            "2000",
            f"{seconds:g}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["p99_us"])


def run(ctx: BenchContext) -> dict[str, float]:
    seconds = 2.0 if ctx.quick else 4.0
    work = Path(tempfile.mkdtemp(prefix="weft-bench-agent-"))
    figures: dict[str, float] = {}
    cpu = 0.0
    traced = 0
    rss = 0.0
    start_cpu: list[float] = []
    for kind in ("go", "python", "nginx"):
        path = "/index.html" if kind == "nginx" else "/bench"
        with running(kind, work) as srv:
            wrk(srv.url(path), 1)  # warm-up
            off: list[float] = []
            on: list[float] = []
            for round_ in range(2):
                off.append(wrk(srv.url(path), seconds)[0])
                agent = Agent(work / f"{kind}-{round_}.wcap")
                start_cpu.append(agent.start_cpu_s)
                cpu0 = agent.cpu_s()
                rps, n = wrk(srv.url(path), seconds)
                cpu += agent.cpu_s() - cpu0
                traced += n
                rss = max(rss, agent.rss_mb())
                agent.stop()
                on.append(rps)
            ratio = (sum(on) / len(on)) / (sum(off) / len(off))
            ctx.console.print(f"{kind}: off {off} on {on} req/s → ratio {ratio:.3f}")
            figures[f"agent.ratio.{kind}"] = ratio
    with running("go", work) as srv:
        p_off = paced_p99(srv, seconds)
        agent = Agent(work / "paced.wcap")
        p_on = paced_p99(srv, seconds)
        agent.stop()
        ctx.console.print(f"p99 at 2k req/s: off {p_off:.0f} µs, on {p_on:.0f} µs")
        figures["agent.p99_added_us"] = p_on - p_off

        agent = Agent(work / "lost.wcap")
        cpu0 = agent.cpu_s()
        rps, n = wrk(srv.url("/lost"), seconds, conns=16)
        cpu += agent.cpu_s() - cpu0
        traced += n
        rss = max(rss, agent.rss_mb())
        agent.stop()
        seen = server_records(work / "lost.wcap", srv.port)
        ctx.console.print(
            f"full speed {rps:.0f} req/s: wrk completed {n}, agent captured {seen} server records"
        )
        # wrk counts only completed requests; requests cut at the deadline may still be recorded
        figures["agent.lost_20k"] = max(0, n - seen)
    ctx.console.print(f"agent CPU {cpu:.2f} s and peak RSS {rss:.0f} MB over {traced} traced requests "
                      f"(not counted: {min(start_cpu):.1f}–{max(start_cpu):.1f} s CPU to start)")
    # HTTP/connection/goroutine records travel as the kernel wrote them (schema v2): fewer CPU
    # cycles in the agent, more bytes per request on the wire; shown, not a figure.
    written = sum(f.stat().st_size for f in work.glob("*.wcap") if f.name != "paced.wcap")
    ctx.console.print(f"capture files: {written / max(1, traced):.0f} bytes per traced request")
    figures["agent.cpu_s_per_10k"] = cpu / traced * 10_000
    figures["agent.rss_mb_1m"] = rss
    return figures
