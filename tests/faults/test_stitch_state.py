"""The stitcher's state lost or a node gone silent, with the real `weft stitch` / `weft replay`:

* Redis flushed (FLUSHALL) while a worker stitches: `weft replay` of the topic into Redis gives
  exactly the traces of a clean run (the offline rebuild of the same frames, which the stream
  tests prove equal to an undisturbed worker's export).
* One node's agent killed: its frames stop. The other nodes' spans are still exported once that
  node lags by the node timeout; the dead node's frames that arrive afterwards become spans
  marked late (`weft.late`), exported, not lost.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from stitcher.engine import EngineConfig
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from tests.faults.exported import check_export
from tests.integration.stitch_harness import WEFT, StitchRun, rebuild_spans
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra]


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def wait_quiet(rx: OtlpReceiver, quiet_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Until nothing new arrived for quiet_s (the worker has consumed what there was)."""
    deadline = time.monotonic() + timeout_s
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(rx.spans)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)


def replay_into_redis(run: StitchRun, rx: OtlpReceiver) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    return subprocess.run([WEFT, "replay", "--bootstrap", run.bootstrap, "--topic", run.raw_topic,
                           "--store", "redis", "--redis-url", run.redis_url, "--otlp"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_redis_flushed_mid_run_then_replay_equals_a_clean_run(
        infra: Any, private_redis: str, tmp_path: Path) -> None:
    sim = Simulation(SimConfig(nodes=4, rps=25, seconds=3, seed=31))
    sim.run()
    frames = list(interleaved_frames(sim))
    clean = rebuild_spans(frames, sim.node_names)
    run = StitchRun.fresh(infra, sim.node_names, partitions=2)
    run.redis_url = private_redis
    half = len(frames) // 2
    with OtlpReceiver() as live:
        try:
            run.start_worker(tmp_path / "worker.log", live.endpoint)
            run.wait_assigned(2)
            run.produce(frames[:half])
            live.wait_for(1, timeout=60)
            assert redis.Redis.from_url(private_redis).flushall()
            run.produce(frames[half:])
            wait_quiet(live)
        finally:
            run.stop_all()
        disturbed = check_export(clean, live.requests)
    with OtlpReceiver() as rx:
        done = replay_into_redis(run, rx)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: len(rx.spans) >= len(clean), 30, "the replay's spans")
        replayed = check_export(clean, rx.requests)
    print(f"redis flushed mid-run: live export vs clean run: {disturbed}; "
          f"replay vs clean run: {replayed}")
    assert replayed.exact and replayed.duplicated == 0 and replayed.received == len(clean), replayed


def test_dead_node_times_out_others_flush_and_its_late_spans_are_counted(
        infra: Any, tmp_path: Path) -> None:
    timeout_s = 2.0
    config = EngineConfig(node_timeout_s=timeout_s)
    sim = Simulation(SimConfig(nodes=3, rps=20, seconds=4, seed=57, dup_rate=0.0))
    sim.run()
    dead = sim.node_names[2]
    frames = list(interleaved_frames(sim))
    # The dead node's agent stops 2 s into the run: its later frames come only after a restart.
    cut = frames[0].t_min_ns + 3_000_000_000
    before = [f for f in frames if f.node != dead or f.t_max_ns < cut]
    after = [f for f in frames if f.node == dead and f.t_max_ns >= cut]
    alive_nodes = set(sim.node_names) - {dead}
    expected_alive = {s.span_id for s in rebuild_spans(before, sim.node_names, config)
                      if s.resource.node in alive_nodes}
    dead_all = {s.span_id for s in rebuild_spans(frames, sim.node_names, config)
                if s.resource.node == dead}
    run = StitchRun.fresh(infra, sim.node_names, partitions=2)
    env = {"WEFT_ENGINE_NODE_TIMEOUT_S": str(timeout_s)}
    with OtlpReceiver() as rx:
        try:
            run.start_worker(tmp_path / "worker.log", rx.endpoint, env)
            run.wait_assigned(2)
            run.produce(before)
            wait_until(lambda: expected_alive <= {s.span_id for s in rx.spans}, 60,
                       "the live nodes' spans while a node is silent")
            run.produce(after)                     # the dead node's agent is back
            wait_until(lambda: dead_all <= {s.span_id for s in rx.spans}, 60, "the dead node's spans")
        finally:
            run.stop_all()
    late = [s for s in rx.spans if s.attributes.get("weft.late") is True]
    late_ids = {s.span_id for s in late}
    print(f"node timeout {timeout_s} s: {len(expected_alive)} spans of live nodes exported while "
          f"{dead} was silent; {len(dead_all)} spans of {dead}, {len(late_ids)} of them late")
    assert late_ids and late_ids <= dead_all
    assert all(s.attributes.get("weft.link") == "orphan" and not s.parent_span_id for s in late)
