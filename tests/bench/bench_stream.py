"""Streaming stitcher figures (`--only stream`): Faust workers with Redis state and OTLP export.

stitch.faust_1w_eps / stitch.faust_2w_eps — events/s sustained by 1 / 2 `weft stitch` workers
    (subprocesses, 4 partitions, real broker + Redis, OTLP/gRPC export to a real receiver):
    workers join first, then a simulated workload is produced as fast as possible; the clock
    runs from the first frame produced to the last expected span received.
stitch.export_p95_s (and _p50_s) — request end → span exported, default settings: the workload
    is produced in real time (each frame when its watermark tick comes due, so watermarks flow
    at wall-clock pace); per span, from producing the frame that carries its request to the
    span arriving at the OTLP receiver.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer

from schemas import weft_events_pb2 as pb
from schemas.codec import encode_frame
from stitcher.engine import Engine
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.state_memory import MemoryStateStore
from tests.bench.bench_infra import shared_infra
from tests.bench.context import BenchContext
from tests.integration.stitch_harness import StitchRun, rebuild_spans
from tests.otlp_receiver import OtlpReceiver

PARTITIONS = 4


def _throughput(ctx: BenchContext, workers: int, sim: Simulation, frames: list[pb.Frame],
                expected_spans: int, logs: Path) -> float:
    infra = shared_infra(ctx)
    run = StitchRun.fresh(infra, sim.node_names, partitions=PARTITIONS)
    events = sum(len(f.events) for f in frames)
    with OtlpReceiver() as rx:
        try:
            for i in range(workers):
                run.start_worker(logs / f"tput{workers}w-{i}.log", rx.endpoint)
            run.wait_assigned(PARTITIONS)
            t0 = time.monotonic()
            run.produce(frames)
            spans = rx.wait_for(expected_spans, timeout=600)
        finally:
            run.stop_all()
    elapsed = max(s.received_at for s in spans) - t0
    eps = events / elapsed
    ctx.console.print(f"{workers} worker(s): {events:,} events ({len(frames):,} frames, "
                      f"{expected_spans:,} spans) in {elapsed:.2f} s → {eps:,.0f} events/s")
    return eps


def _p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _latency(ctx: BenchContext, logs: Path) -> dict[str, float]:
    """Request end → span exported, workload produced in real time: p50/p95 over all spans,
    and p95 over entry (root SERVER) spans, which do not wait for a parent."""
    sim = Simulation(SimConfig(nodes=8, rps=40, seconds=4 if ctx.quick else 8, seed=31))
    sim.run()
    frames = list(interleaved_frames(sim))
    infra = shared_infra(ctx)
    run = StitchRun.fresh(infra, sim.node_names, partitions=PARTITIONS)
    producer = Producer({"bootstrap.servers": run.bootstrap, "enable.idempotence": True, "linger.ms": 0})
    produced_at: dict[bytes, float] = {}  # span id → when the frame with its request was produced
    namer = Engine(MemoryStateStore())     # only to name spans as the workers' engines do
    with OtlpReceiver() as rx:
        try:
            run.start_worker(logs / "latency.log", rx.endpoint)
            run.wait_assigned(PARTITIONS)
            sim_t0 = frames[0].t_max_ns
            wall_t0 = time.monotonic()
            for frame in frames:
                due = wall_t0 + (frame.t_max_ns - sim_t0) / 1e9
                while (now := time.monotonic()) < due:
                    producer.poll(min(due - now, 0.05))
                producer.produce(run.raw_topic, encode_frame(frame), frame.node.encode())
                producer.poll(0)
                sent = time.monotonic()
                for sid in namer.span_ids(frame):
                    if sid is not None:
                        produced_at.setdefault(bytes.fromhex(sid), sent)
            producer.flush(30)
            expected = len(rebuild_spans(frames, sim.node_names))
            spans = rx.wait_for(expected, timeout=120)
        finally:
            run.stop_all()
    delays = sorted(s.received_at - produced_at[s.span_id] for s in spans if s.span_id in produced_at)
    roots = sorted(s.received_at - produced_at[s.span_id] for s in spans
                   if s.span_id in produced_at and not s.parent_span_id and s.kind == 2)
    figures = {"stitch.export_p50_s": statistics.median(delays), "stitch.export_p95_s": _p(delays, 0.95),
               "stitch.export_root_p95_s": _p(roots, 0.95)}
    ctx.console.print(f"latency: {len(delays):,} spans, p50 {figures['stitch.export_p50_s']:.2f} s, "
                      f"p95 {figures['stitch.export_p95_s']:.2f} s, max {delays[-1]:.2f} s; "
                      f"{len(roots):,} root spans p95 {figures['stitch.export_root_p95_s']:.2f} s")
    return figures


def run(ctx: BenchContext) -> dict[str, float]:
    logs = Path(tempfile.mkdtemp(prefix="weft-bench-stream-"))
    sim = Simulation(SimConfig(nodes=8, rps=300 if ctx.quick else 600, seconds=5 if ctx.quick else 8,
                               seed=17))
    sim.run()
    frames = list(interleaved_frames(sim))
    expected_spans = len(rebuild_spans(frames, sim.node_names))
    figures = {
        "stitch.faust_1w_eps": _throughput(ctx, 1, sim, frames, expected_spans, logs),
        "stitch.faust_2w_eps": _throughput(ctx, 2, sim, frames, expected_spans, logs),
    }
    figures.update(_latency(ctx, logs))
    ctx.console.print(f"worker logs: {logs}")
    return figures
