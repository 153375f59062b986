"""`weft stitch` at start-up: a Kafka or Redis that does not answer is named in one sentence
(where it was looked for, no password, no traceback), after waiting `stitch.startup_wait_s` for
it; one that comes up during that wait is used. A bad setting is one sentence too."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.procs import free_port, stop_daemon
from infra.redis_server import start_redis
from tests.integration.stitch_harness import WEFT, StitchRun
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra]


def _stitch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WEFT, "stitch", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_unreachable_kafka_and_redis_are_named_in_one_sentence() -> None:
    redis_port, kafka_port = free_port(), free_port()
    done = _stitch("--redis-url", f"redis://weft:s3cret@127.0.0.1:{redis_port}/0",
                   "--bootstrap", f"127.0.0.1:{kafka_port}", WEFT_STITCH_STARTUP_WAIT_S="0")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
    assert line.startswith(f"Error: cannot start: Redis: no answer from redis://127.0.0.1:{redis_port}/0 ")
    assert f"Kafka: no answer from 127.0.0.1:{kafka_port} " in line
    assert line.endswith("Start them (`weft infra up` for the local ones) or point redis.url / "
                         "kafka.bootstrap (WEFT_REDIS_URL, WEFT_KAFKA_BOOTSTRAP) at running ones.")


def test_only_what_is_missing_is_named(infra: Any) -> None:
    kafka_port = free_port()
    done = _stitch("--redis-url", infra.redis_url, "--bootstrap", f"127.0.0.1:{kafka_port}",
                   WEFT_STITCH_STARTUP_WAIT_S="0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot start: Kafka: no answer" in done.stderr and "Redis:" not in done.stderr


def test_a_redis_that_refuses_the_session_is_not_called_missing(infra: Any) -> None:
    """Redis is there but refuses these credentials: the sentence says so and points at the
    settings; it does not tell the user to start a Redis."""
    done = _stitch("--redis-url", infra.redis_url, "--bootstrap", infra.bootstrap,
                   WEFT_REDIS_USERNAME="nobody", WEFT_REDIS_PASSWORD="wr0ng",
                   WEFT_STITCH_STARTUP_WAIT_S="0")
    assert done.returncode == 1 and "Traceback" not in done.stderr and "wr0ng" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
    assert line.startswith(f"Error: cannot start: Redis: {infra.redis_url} accepts connections but refused "
                           "the session (")
    assert line.endswith("check redis.password / redis.username and the redis.ssl_* settings.")
    assert "Kafka:" not in line and "weft infra up" not in line


def test_a_redis_that_evicts_is_named_with_what_to_do(infra: Any, tmp_path: Path) -> None:
    """A Redis with a memory limit and an eviction policy would drop join state when full: the
    stitcher says so at start (and `weft doctor` too); the shared Redis (no limit) draws nothing."""
    port = free_port()
    daemon = start_redis(tmp_path / "redis", port)
    try:
        redis.Redis(port=port).config_set("maxmemory", str(64 << 20))
        redis.Redis(port=port).config_set("maxmemory-policy", "volatile-lru")
        url = f"redis://127.0.0.1:{port}/0"
        done = _stitch("--redis-url", url, "--bootstrap", f"127.0.0.1:{free_port()}",
                       WEFT_STITCH_STARTUP_WAIT_S="0")
        doctor = subprocess.run([WEFT, "doctor"], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "WEFT_REDIS_URL": url})
    finally:
        stop_daemon(daemon)
    sentence = (f"{url} evicts keys when full (maxmemory 64 MiB, maxmemory-policy volatile-lru): under "
                "memory pressure it would drop join state, and spans would lose their links or be "
                "exported twice; set maxmemory-policy noeviction (a full Redis then refuses writes: the "
                "stitcher retries, then stops with the reason) or give Weft a Redis of its own")
    assert done.returncode == 1 and sentence in done.stderr, done.stderr    # then: Kafka is missing
    assert f"redis: warning: {sentence}" in doctor.stdout, doctor.stdout
    quiet = _stitch("--redis-url", infra.redis_url, "--bootstrap", f"127.0.0.1:{free_port()}",
                    WEFT_STITCH_STARTUP_WAIT_S="0")
    assert "evicts keys" not in quiet.stderr


def test_a_bad_setting_is_one_sentence() -> None:
    done = _stitch(WEFT_STITCH_METRICS_PORT="70000")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "Error: stitch.metrics_port=70000: must be 0 (off) or a TCP port"


@pytest.mark.slow
def test_a_redis_that_comes_up_during_the_wait_is_used(infra: Any, tmp_path: Path) -> None:
    port = free_port()
    run = dataclasses.replace(StitchRun.fresh(infra, ["n1"], partitions=1),
                              redis_url=f"redis://127.0.0.1:{port}/0")
    started: list[Any] = []
    later = threading.Timer(3.0, lambda: started.append(start_redis(tmp_path / "redis", port)))
    with OtlpReceiver() as rx:
        try:
            worker = run.start_worker(tmp_path / "worker.log", rx.endpoint,
                                      {"WEFT_STITCH_STARTUP_WAIT_S": "60"})
            later.start()
            run.wait_assigned(1, timeout=90)
            assert "waiting up to 60 s for Redis: no answer" in worker.text()
        finally:
            later.cancel()
            run.stop_all()
            for daemon in started:
                stop_daemon(daemon)
