"""A `weft stitch` worker SIGKILLed mid-stream and restarted: every span of the offline rebuild
reaches the OTLP receiver, and a span exported twice is byte-identical (same IDs), so a backend
can drop the copy."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from stitcher.engine.records import OUTBOX
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from tests.faults.exported import check_export
from tests.integration.stitch_harness import StitchRun, rebuild_spans
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra]


def produce_paced(run: StitchRun, frames: list[Any], seconds: float) -> threading.Thread:
    """Produce the frames spread over `seconds` (a steady stream the kill lands inside)."""
    chunks = 20
    size = -(-len(frames) // chunks)

    def feed() -> None:
        for i in range(0, len(frames), size):
            run.produce(frames[i:i + size])
            time.sleep(seconds / chunks)

    thread = threading.Thread(target=feed, name="paced-producer")
    thread.start()
    return thread


def kill_with_outbox(client: redis.Redis, key: str, pid: int, timeout_s: float) -> None:
    """SIGKILL the worker at a moment its outbox holds spans. It is stopped (SIGSTOP) before the
    outbox is looked at, so it cannot acknowledge them between the look and the kill; the pause
    lets a command it sent just before the stop reach Redis."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "the worker never had unacknowledged spans"
        if client.scard(key):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.05)
            if client.scard(key):
                os.kill(pid, signal.SIGKILL)
                return
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)


def wait_export_complete(rx: OtlpReceiver, expected: int, timeout_s: float) -> None:
    """Until the receiver holds every expected span id, or the time is up (the caller checks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len({s.span_id for s in rx.spans}) >= expected:
            return
        time.sleep(0.2)


# The exporter's queue at the kill (which lands while the outbox is not empty): with the
# default 200 ms batch delay those spans may have left already (a re-export is then a
# duplicate, identical); with a delay longer than the run, spans leave the worker only at the
# flush before each offset commit, so the kill finds them stitched, marked emitted in Redis,
# and never exported: without the outbox they would be lost (the redelivered frames are
# duplicates and emit nothing).
EXPORT_QUEUES = {"default_batching": {},
                 "flush_only_at_commit": {"OTEL_BSP_SCHEDULE_DELAY": "600000",
                                          "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100000",
                                          "OTEL_BSP_MAX_QUEUE_SIZE": "200000"}}


@pytest.mark.parametrize("queue", sorted(EXPORT_QUEUES))
def test_worker_sigkilled_mid_stream_then_restarted_loses_no_span(
        infra: Any, private_redis: str, tmp_path: Path, queue: str) -> None:
    sim = Simulation(SimConfig(nodes=4, rps=30, seconds=4, seed=77))
    sim.run()
    frames = list(interleaved_frames(sim))
    expected = rebuild_spans(frames, sim.node_names)
    run = StitchRun.fresh(infra, sim.node_names, partitions=2)
    run.redis_url = private_redis
    with OtlpReceiver() as rx:
        try:
            first = run.start_worker(tmp_path / "first.log", rx.endpoint, EXPORT_QUEUES[queue])
            run.wait_assigned(2)
            feeder = produce_paced(run, frames, seconds=6.0)
            rx.wait_for(len(expected) // 4, timeout=60)     # mid-stream: a quarter exported
            # ... and inside the window: spans stitched (marked emitted in Redis) whose export
            # is not acknowledged yet, i.e. the engine's outbox is not empty.
            outbox = redis.Redis.from_url(private_redis)
            kill_with_outbox(outbox, f"{run.namespace}{OUTBOX}", first.proc.pid, timeout_s=60)
            assert first.proc.wait(10) == -signal.SIGKILL
            at_kill = len(rx.spans)
            second = run.start_worker(tmp_path / "second.log", rx.endpoint)
            feeder.join(60)
            wait_export_complete(rx, len(expected), timeout_s=90)
        finally:
            run.stop_all()
        check = check_export(expected, rx.requests)
    print(f"sigkill ({queue}): expected {check.expected}, exported before the kill {at_kill}, received "
          f"{check.received}, missing {check.missing}, duplicated {check.duplicated}, "
          f"duplicates that differ {check.duplicates_differ}")
    assert second.frames_done() > 0, second.tail()
    again = re.search(r"exported (\d+) spans again", second.text())
    assert again is not None and int(again.group(1)) > 0, second.tail()   # the outbox was re-sent
    assert check.missing == 0, f"{check.missing} spans never exported: {check}"
    assert check.duplicates_differ == 0 and check.wrong == 0 and check.extra == 0, check
