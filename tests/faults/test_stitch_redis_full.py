"""A Redis that is full and set not to evict (what `weft doctor` recommends) refuses the
stitcher's writes: the worker retries, then stops with Redis's reason and exit code 75
(EX_TEMPFAIL: restart me), having acked nothing it could not store; restarted once there is
room, a worker reads those frames again and every span of the workload is exported."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.procs import free_port, stop_daemon
from infra.redis_server import start_redis
from stitcher.app import EXIT_STORE_DOWN
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from tests.integration.stitch_harness import StitchRun, rebuild_spans, received_bytes, span_bytes
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra, pytest.mark.slow]


def test_a_full_redis_stops_the_worker_with_the_reason_and_loses_nothing(infra: Any, tmp_path: Path) -> None:
    port = free_port()
    daemon = start_redis(tmp_path / "redis", port)
    sim = Simulation(SimConfig(nodes=4, rps=200, seconds=3, seed=23))
    sim.run()
    expected = set(span_bytes(rebuild_spans(interleaved_frames(sim), sim.node_names)))
    run = dataclasses.replace(StitchRun.fresh(infra, sim.node_names, partitions=1),
                              redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        client = redis.Redis(port=port)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", str(used + (256 << 10)))   # room for a little join state
        client.config_set("maxmemory-policy", "noeviction")
        with OtlpReceiver() as rx:
            try:
                first = run.start_worker(tmp_path / "first.log", rx.endpoint,
                                         {"WEFT_STITCH_STORE_ATTEMPTS": "3"})
                run.wait_assigned(1)
                run.produce(interleaved_frames(sim))
                code = first.proc.wait(timeout=120)
                stored = client.dbsize()
                client.config_set("maxmemory", "0")                    # room again: a restart
                second = run.start_worker(tmp_path / "second.log", rx.endpoint)
                rx.wait_for(len(expected), timeout=120)
                deadline = time.monotonic() + 60    # copies from the first worker count once
                while (received := received_bytes(rx.requests)) and set(received) != expected:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            finally:
                run.stop_all()
    finally:
        stop_daemon(daemon)
    text = first.text()
    assert code == EXIT_STORE_DOWN, first.tail()
    assert ("could not be stored: OutOfMemoryError: command not allowed when used memory > 'maxmemory'"
            in text), first.tail()
    assert "exiting (code 75) so the frame is redelivered" in text
    assert stored > 0                                   # it stored what fitted, then stopped
    assert set(received) == expected, (len(set(received)), len(expected), second.tail())
