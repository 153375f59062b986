"""Cost of the goroutine probe (issue 6), side by side in one run.

The http and goroutine probes are loaded once (tests/integration/probe_harness.py). Two copies
of tests/workloads/go_fanout.go (two files, so uprobes sit on one only) serve GET /fan/<id>,
which starts two goroutines that each call a leaf server (no sleep). The "on" copy is
registered with the goroutine probe (uprobes in newproc's closure at its CALL runqput, in the
prologues of persistConn.roundTrip and Request.write, and goroutine ids read at each socket
syscall; see probe_agent/gobinary.py for why those instructions); the "off" copy is
traced by the http probe only. wrk drives each in turn (off, on, off, on).

  goroutines.ratio_fanout       throughput on ÷ off (each request: 2 `go`, 2 client calls)
  goroutines.added_us_per_req   1e6/rps(on) − 1e6/rps(off): the machine's time per request
                                that the probe adds (both CPUs saturated)
  goroutines.added_ns_per_go    per `go` statement: (time to start N goroutines registered −
                                unregistered) / N, from the Go program's own clock

Indicative on this 2-CPU machine shared with other work.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from probe_agent.probes.goroutines import GoroutineProbe
from probe_agent.probes.http import HttpProbe
from tests.bench.bench_agent import wrk
from tests.bench.context import BenchContext
from tests.integration.probe_harness import loaded
from tests.workloads.servers import free_port, go_binary, wait_port


def _serve(binary: Path, downstream: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([str(binary), f"127.0.0.1:{port}", downstream, "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, proc)
    return proc, port


def _spawn_ns(binary: Path, n: int, probe: GoroutineProbe | None) -> int:
    proc = subprocess.Popen([str(binary), "spawn", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if probe is not None:
        assert probe.register(proc.pid)
    out, _ = proc.communicate(b"go\n", timeout=60)
    return int(out)


def run(ctx: BenchContext) -> dict[str, float]:
    seconds, rounds, spawns = (2.0, 2, 50_000) if ctx.quick else (5.0, 3, 200_000)
    work = Path(tempfile.mkdtemp(prefix="weft-bench-go-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        built = go_binary("go_fanout", work)
        on_bin, off_bin = work / "fan_on", work / "fan_off"
        shutil.copy(built, on_bin)
        shutil.copy(built, off_bin)
        env = {"LEAF_SLEEP_MS": "0"}
        with loaded(HttpProbe()) as _http, loaded(GoroutineProbe()) as go:
            probe = go.probe
            assert isinstance(probe, GoroutineProbe)
            leaf, leaf_port = _serve(off_bin, "unused", env)
            procs.append(leaf)
            off, off_port = _serve(off_bin, f"127.0.0.1:{leaf_port}", env)
            on, on_port = _serve(on_bin, f"127.0.0.1:{leaf_port}", env)
            procs += [off, on]
            assert probe.register(on.pid)
            rps: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(rounds):
                for name, port in (("off", off_port), ("on", on_port)):
                    go.clear()
                    _http.clear()
                    rps[name].append(wrk(f"http://127.0.0.1:{port}/fan/b", seconds)[0])
            spawn_off = _spawn_ns(off_bin, spawns, None)
            spawn_on = _spawn_ns(on_bin, spawns, probe)
        on_rps, off_rps = statistics.mean(rps["on"]), statistics.mean(rps["off"])
        ctx.console.print(f"fan-out req/s off {rps['off']} on {rps['on']}; {spawns} goroutines: "
                          f"{spawn_off / 1e6:.1f} ms off, {spawn_on / 1e6:.1f} ms on")
        return {
            "goroutines.ratio_fanout": on_rps / off_rps,
            "goroutines.added_us_per_req": 1e6 / on_rps - 1e6 / off_rps,
            "goroutines.added_ns_per_go": (spawn_on - spawn_off) / spawns,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=5)
        shutil.rmtree(work, ignore_errors=True)
