"""Issue 2's round trip: every event kind, every field set, produced with confluent-kafka to the real
broker, consumed by a real Faust agent (a worker subprocess), decoded, and equal to what was sent.

Run as a script, this file is that Faust worker: `python test_infra_roundtrip.py BOOTSTRAP TOPIC
APP_ID OUT_FILE DATA_DIR`. The agent appends each message value to OUT_FILE as a u32 length and the
bytes; the test polls that file.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from infra.procs import stop_pid
from infra.services import LocalInfra
from schemas import weft_events_pb2 as pb
from schemas.codec import EVENT_KINDS, decode_frame, encode_frame, make_frame
from tests.golden import make_golden

_LEN = struct.Struct("<I")


def _read_values(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    values, pos = [], 0
    while pos + _LEN.size <= len(data):
        (size,) = _LEN.unpack_from(data, pos)
        if pos + _LEN.size + size > len(data):
            break  # the worker is mid-write
        values.append(data[pos + _LEN.size : pos + _LEN.size + size])
        pos += _LEN.size + size
    return values


def _frames() -> list[pb.Frame]:
    """One frame per kind (a lone event of that kind), then one frame with every kind."""
    events = make_golden.sample_events_current()
    frames = [make_frame("node-rt", [event], agent_instance=7, seq=i) for i, event in enumerate(events)]
    frames.append(make_frame("node-rt", events, agent_instance=7, seq=len(frames)))
    return frames


@pytest.mark.slow
def test_every_kind_round_trips_through_broker_and_faust(infra: LocalInfra, tmp_path: Path) -> None:
    topic = f"weft.roundtrip.{uuid.uuid4().hex[:8]}"
    infra.create_topic(topic, 2)
    sent = _frames()
    assert {e.WhichOneof("kind") for e in sent[-1].events} == set(EVENT_KINDS)
    producer = Producer({**infra.kafka_settings().confluent(), "enable.idempotence": True, "acks": "all"})
    for frame in sent:
        producer.produce(topic, key=frame.node.encode(), value=encode_frame(frame))
    assert producer.flush(15) == 0, "broker did not acknowledge every frame"
    del producer  # its connection would outlive the session's broker and log errors

    out = tmp_path / "received.bin"
    log = tmp_path / "worker.log"
    argv = [sys.executable, __file__, infra.bootstrap, topic, f"weft-rt-{uuid.uuid4().hex[:8]}",
            str(out), str(tmp_path / "faust-data")]
    repo = Path(__file__).resolve().parents[2]
    path = [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with open(log, "wb") as log_fh:
        worker = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, cwd=repo, env=env)
    try:
        deadline = time.monotonic() + 90
        while len(_read_values(out)) < len(sent):
            assert worker.poll() is None, f"Faust worker exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"got {len(_read_values(out))} of {len(sent)} frames; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        stop_pid(worker.pid, grace_s=10)  # SIGTERM: Faust leaves the group and exits in ~1 s
        worker.wait(timeout=5)
    received = [decode_frame(value) for value in _read_values(out)]
    # One key, so one partition, so Kafka keeps the producer's order.
    assert received == sent
    assert [encode_frame(f) for f in received] == [encode_frame(f) for f in sent]


def _worker(bootstrap: str, topic_name: str, app_id: str, out_path: str, data_dir: str) -> None:
    import faust

    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        web_enabled=False,                      # the `--without-web` of the Faust CLI
        datadir=data_dir,
        broker_session_timeout=10.0,            # Tansu joins take ~half of it (DESIGN.md)
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",  # the frames were produced before the worker started
        topic_replication_factor=1,
        topic_partitions=1,
        producer_acks=1,
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")
    out = open(out_path, "ab")  # noqa: SIM115 - lives as long as the worker process

    @app.agent(topic, concurrency=1)
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            out.write(_LEN.pack(len(value)) + value)
            out.flush()

    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
