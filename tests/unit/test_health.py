"""/healthz and /readyz: the HTTP answers, and when a stitcher worker counts as stuck."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from stitcher.consumer_lag import ConsumerLag
from stitcher.health import WorkerHealth
from tests.http_get import http_get
from weft.health import HealthApp, serve


def _get(port: int, path: str) -> tuple[int, str]:
    return http_get(f"http://127.0.0.1:{port}{path}")


def test_the_checks_answer_beside_the_metrics() -> None:
    registry = CollectorRegistry()
    Counter("weft_probe_things", "things", registry=registry).inc(3)
    state = {"live": (True, "turning"), "ready": (False, "not yet")}

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    port = serve(HealthApp(registry, lambda: state["live"], lambda: state["ready"]), 0)
    assert _get(port, "/healthz") == (200, "ok: turning\n")
    assert _get(port, "/readyz") == (503, "not ok: not yet\n")
    state["live"] = (False, "stuck for 12 s")
    assert _get(port, "/healthz") == (503, "not ok: stuck for 12 s\n")
    status, text = _get(port, "/metrics")
    assert status == 200 and "weft_probe_things_total 3.0" in text
    assert _get(port, "/")[0] == 200                     # as prometheus_client serves it
    other = serve(HealthApp(registry, broken), 0)
    assert _get(other, "/healthz") == (503, "not ok: the check itself failed: RuntimeError('boom')\n")
    assert _get(other, "/readyz") == (200, "ok: running\n")


@dataclass
class _Progress:
    last_batch_at: float = 0.0


def test_a_worker_that_joins_batches_is_running_before_its_first_beat() -> None:
    # Faust starts timers late after a rebalance; the batches show the loop runs meanwhile
    now = [1000.0]
    progress = _Progress()
    health = WorkerHealth(progress, ConsumerLag(threshold=20), stall_s=60, clock=lambda: now[0])
    now[0] += 8
    assert health.live() == (True, "starting for 8 s")
    progress.last_batch_at = now[0] - 0.5
    assert health.live() == (True, "0 messages behind, last batch 0.5 s ago")
    now[0] += 100        # then nothing: no batch, and still no beat
    assert health.live() == (False, "the worker's event loop has not run for 100 s")


def test_a_worker_is_stuck_when_its_loop_stops_or_it_is_behind_and_joins_nothing() -> None:
    now = [1000.0]
    progress, lag = _Progress(), ConsumerLag(threshold=20)
    health = WorkerHealth(progress, lag, stall_s=60, clock=lambda: now[0])
    now[0] += 90         # Faust takes its time to start: not a reason to be restarted
    assert health.live() == (True, "starting for 90 s")
    assert health.ready() == (False, "not in the consumer group yet (no partitions assigned so far)")
    health.beat()
    health.joined = True
    now[0] += 100        # idle with nothing to read: fine, as long as the loop beats
    health.beat()
    assert health.live() == (True, "0 messages behind, last batch 100.0 s ago")
    lag.observe(0, offset=10, highwater=50)                   # 39 messages wait
    assert health.live()[0] is False and "39 messages wait" in health.live()[1]
    progress.last_batch_at = now[0] - 5                       # ... and a batch ended 5 s ago
    assert health.live() == (True, "39 messages behind, last batch 5.0 s ago")
    assert health.ready() == health.live()
    now[0] += 61                                              # the event loop stopped beating
    assert health.live() == (False, "the worker's event loop has not run for 61 s")
    assert health.ready()[0] is False
