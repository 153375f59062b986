"""Stitcher figures (H2a): offline rebuild throughput and accuracy on `weft simulate`.

stitch.rebuild_eps       events per second of CPU time, `weft rebuild --out` end to end on one
                         core: reading and decoding the capture files, the join, span building
                         and writing the OTLP JSON lines; stitch.rebuild_eps_wall is the same per
                         wall-clock second (lower when other work shares the machine)
stitch.rebuild_join_eps  the same without the JSON write (join only, the pre-S3 definition)
stitch.sim_precision     edge precision on a 200-node simulated mesh (target 1.0)
stitch.sim_recall        edge recall on the same run (target ≥ 0.999)
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from stitcher.rebuild import rebuild, write_json_lines
from stitcher.simulate import SimConfig, Simulation, write_captures
from stitcher.verify import Stitched, compare
from tests.bench.context import BenchContext


def run(ctx: BenchContext) -> dict[str, float]:
    cfg = SimConfig(nodes=200, rps=300 if ctx.quick else 1500, seconds=3.0 if ctx.quick else 8.0, seed=42)
    with tempfile.TemporaryDirectory(prefix="weft-bench-stitch-") as tmp:
        sim = Simulation(cfg)
        sim.run()
        paths, frames = write_captures(sim, Path(tmp))
        ctx.console.print(f"simulated {cfg.nodes} nodes, {len(sim.truth)} spans, {frames} frames")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = rebuild(paths)
        join_cpu = time.process_time() - cpu0
        write_json_lines(result.spans, io.StringIO())
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    truth = {row["span"]: (row["parent"], row["hop"]) for row in sim.truth}
    report = compare([Stitched(s.span_id.hex(), s.parent_span_id.hex(), s.trace_id.hex())
                      for s in result.spans], truth)
    ctx.console.print(f"rebuild: {result.events} events, {len(result.spans)} spans in {wall:.1f} s wall / "
                      f"{cpu:.2f} s CPU ({join_cpu:.2f} s join, {cpu - join_cpu:.2f} s JSON); "
                      f"precision {report.precision:.6f}, recall {report.recall:.6f}, "
                      f"missing {report.missing}, broken traces {report.broken_traces}")
    for hop, score in report.hops.items():
        ctx.console.print(f"  {hop:15} edges {score.true_edges:7}  precision {score.precision:.6f}  "
                          f"recall {score.recall:.6f}")
    return {
        "stitch.rebuild_eps": result.events / cpu,
        "stitch.rebuild_eps_wall": result.events / wall,
        "stitch.rebuild_join_eps": result.events / join_cpu,
        "stitch.sim_precision": report.precision,
        "stitch.sim_recall": report.recall,
    }
