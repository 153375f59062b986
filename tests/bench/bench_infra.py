"""Infra figures: how long the local broker + Redis take to start, to be found again and to stop,
and how long `weft doctor`'s kernel probe takes. `shared_infra(ctx)` gives other bench modules one
LocalInfra per bench run."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from infra.services import LocalInfra
from probe_agent.kernel import probe_kernel
from tests.bench.context import BenchContext


def shared_infra(ctx: BenchContext) -> LocalInfra:
    """The broker and Redis for this bench run, started once on free ports, stopped by ctx.close()."""
    def start() -> tuple[object, Callable[[], None]]:
        run_dir = Path(tempfile.mkdtemp(prefix="weft-bench-"))
        infra = LocalInfra.start(run_dir)

        def stop() -> None:
            infra.stop()
            shutil.rmtree(run_dir, ignore_errors=True)

        return infra, stop

    infra = ctx.once("infra", start)
    assert isinstance(infra, LocalInfra)
    return infra


def run(ctx: BenchContext) -> dict[str, float]:
    rounds = 2 if ctx.quick else 5
    start_s, reuse_s, stop_s, probe_s = [], [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="weft-bench-infra-") as tmp:
            t0 = time.perf_counter()
            infra = LocalInfra.start(Path(tmp))
            t1 = time.perf_counter()
            LocalInfra.start(Path(tmp))
            t2 = time.perf_counter()
            infra.stop()
            t3 = time.perf_counter()
        start_s.append(t1 - t0)
        reuse_s.append(t2 - t1)
        stop_s.append(t3 - t2)
        t4 = time.perf_counter()
        probe_kernel()
        probe_s.append(time.perf_counter() - t4)
    figures = {
        "infra.start_s": statistics.median(start_s),
        "infra.reuse_s": statistics.median(reuse_s),
        "infra.stop_s": statistics.median(stop_s),
        "doctor.probe_s": statistics.median(probe_s),
    }
    ctx.console.print(f"infra: median of {rounds} rounds (start = broker + Redis + 2 topics, healthy)")
    return figures
