"""A `weft stitch` worker whose broker goes away: it stays up, its log stays readable, and it
still stops on SIGTERM.

aiokafka (under Faust) logs every failed reconnect, fetch and metadata refresh: ~80 ERROR lines a
second with the broker gone (measured: 2,414 lines in 30 s). A stitcher on a fleet would write
millions of lines over a long outage. The worker passes each kind of line on at most every 30 s,
with the count of the ones held back. Stopping, Faust's consumer thread dies on the missing broker
and Faust then waits for it forever (usually: now and then it stops by itself); the worker
leaves after `stitch.stop_timeout_s` anyway, having exported what it had."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra.broker import create_topics, start_broker
from infra.procs import free_port, stop_daemon
from tests.integration.stitch_harness import StitchRun
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.infra, pytest.mark.slow]

OUTAGE_S = 12
STOP_TIMEOUT_S = 5


def test_a_worker_outlives_its_broker_without_flooding_its_log(infra: Any, tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(tmp_path / "broker", port)
    bootstrap = f"127.0.0.1:{port}"
    topic = f"weft.raw.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 2, f"{topic}.dead": 1})
    run = StitchRun(bootstrap=bootstrap, redis_url=infra.redis_url, raw_topic=topic,
                    dead_topic=f"{topic}.dead", group=f"weft-stitch-{uuid.uuid4().hex[:8]}",
                    namespace=f"out{uuid.uuid4().hex[:8]}:", nodes=["n0"])
    try:
        with OtlpReceiver() as rx:
            worker = run.start_worker(tmp_path / "stitch.log", rx.endpoint,
                                      {"WEFT_STITCH_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S)})
            run.wait_assigned(2)
            before = len(worker.text().splitlines())
            os.kill(broker.pid, signal.SIGKILL)
            time.sleep(OUTAGE_S)
            alive = worker.proc.poll() is None
            during = worker.text().splitlines()[before:]
            stopping = time.monotonic()
            code = worker.stop(timeout=STOP_TIMEOUT_S + 20)
            stop_s = time.monotonic() - stopping
    finally:
        stop_daemon(broker)
    # Faust's lines ("[time] [pid] [ERROR] ...") and the dead-letter producer's librdkafka
    # lines (through Python logging: "... ERROR librdkafka: FAIL ...", raw "%3|...|FAIL|" if not)
    errors = [line for line in during if re.search(r"\[ERROR\]|ERROR librdkafka|^%\d\|", line)]
    kinds = {re.sub(r"\d+", "#", line.split("ERROR", 1)[-1]) for line in errors}
    print(f"broker gone {OUTAGE_S} s: {len(during)} log lines, {len(errors)} errors of {len(kinds)} kinds; "
          f"stopped in {stop_s:.1f} s")
    assert alive, "the worker exited when its broker went away"
    assert errors, "the outage was not noticed"
    assert len(errors) <= 2 * len(kinds) + 5, "\n".join(errors[:40])
    assert code == 0 and stop_s < STOP_TIMEOUT_S + 10, (code, stop_s, worker.tail())
    assert "done: frames=" in worker.text(), worker.tail()
    # Faust usually hangs here (its consumer thread died on the missing broker) and the watchdog
    # makes the worker leave; now and then its consumer is still alive and Faust stops by itself
    assert "leaving anyway" in worker.text() or stop_s < STOP_TIMEOUT_S, (stop_s, worker.tail())
