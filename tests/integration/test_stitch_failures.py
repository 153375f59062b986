"""When Redis refuses writes, a `weft stitch` worker must not lose frames: it retries, then exits
hard (code 75) without acking; a new worker gets the frames again and the exported traces
(everything both workers exported) are still exactly the offline rebuild."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (it gets a password set under the worker's feet)."""
    daemon = start_redis(tmp_path / "redis", free_port())
    try:
        yield f"redis://127.0.0.1:{daemon.facts['port']}/0"
    finally:
        stop_daemon(daemon)


def test_store_outage_exits_hard_and_loses_nothing(infra: Any, private_redis: str, tmp_path: Path) -> None:
    sim = Simulation(SimConfig(nodes=4, rps=20, seconds=4, seed=41))
    sim.run()
    frames = list(interleaved_frames(sim))
    expected = span_bytes(rebuild_spans(frames, sim.node_names))
    run = StitchRun.fresh(infra, sim.node_names, partitions=2)
    run.redis_url = private_redis
    admin = redis.Redis.from_url(private_redis)
    # half of the requests come after the lockout (the last frames carry only watermarks: a
    # split by frame count put every request before it, and a worker quick enough to export
    # them all left the test nothing to check)
    with_http = [i for i, f in enumerate(frames) if any(e.WhichOneof("kind") == "http" for e in f.events)]
    half = with_http[len(with_http) // 2]
    with OtlpReceiver() as rx:
        try:
            first = run.start_worker(tmp_path / "first.log", rx.endpoint)
            run.wait_assigned(2)
            run.produce(frames[:half])
            rx.wait_for(1, timeout=60)  # it is stitching
            admin.config_set("requirepass", "locked-out")  # every command of the worker now fails:
            admin.client_kill_filter(_type="normal", skipme=True)  # its connections must log in again
            run.produce(frames[half:])
            assert first.proc.wait(60) == EXIT_STORE_DOWN, first.tail()
            assert "exiting (code 75) so the frame is redelivered" in first.text()
            partial = len(rx.spans)
            assert partial < len(expected)

            admin.execute_command("AUTH", "locked-out")
            admin.config_set("requirepass", "")
            second = run.start_worker(tmp_path / "second.log", rx.endpoint)
            _wait_until_all(rx, expected)
        finally:
            run.stop_all()
    got = received_bytes(rx.requests)
    assert set(got) == set(expected)  # nothing lost; a re-export carries the same ids
    assert second.frames_done() > 0


def _wait_until_all(rx: OtlpReceiver, expected: list[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(expected)
    while time.monotonic() < deadline:
        if wanted <= set(received_bytes(rx.requests)):
            return
        time.sleep(0.2)
    missing = len(wanted - set(received_bytes(rx.requests)))
    raise TimeoutError(f"{missing} of {len(wanted)} spans never arrived")
