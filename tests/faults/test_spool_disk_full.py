"""The agent's spool on a disk that fills up (a real tmpfs of 64 KiB): frames that do not fit are
dropped and counted with the reason, nothing torn is left behind, the spool takes frames again
once there is room, and the agent's Kafka sink never raises — not while spooling, and not at exit
when the frames librdkafka still holds cannot be kept."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.framer import Framer
from probe_agent.metrics import AgentMetrics
from probe_agent.sinks import KafkaSink
from probe_agent.spool import Spool
from schemas import weft_events_pb2 as pb
from weft.config import KafkaSettings


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_drops_frames_counted_and_leaves_the_spool_whole(small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 32 * 1024)               # someone else's half of the disk
    spool = Spool(small_disk / "spool", segment_bytes=8 * 1024)
    accepted = [i for i in range(100) if spool.append(i.to_bytes(4, "little") * 250)]
    assert 10 < len(accepted) < 100, len(accepted)
    assert spool.dropped_frames == 100 - len(accepted)
    assert spool.refused.startswith(f"cannot write {small_disk / 'spool'}: No space left on device")
    assert spool.frames == len(accepted)

    filler.unlink()                                      # room again
    assert spool.append((100).to_bytes(4, "little") * 250)
    spool.close()

    again = Spool(small_disk / "spool")                  # a restart finds every whole record, in order
    got = [int.from_bytes(data[:4], "little") for data, _ in again.read(1000)]
    assert got == [*accepted, 100]
    again.close()


def test_the_kafka_sink_spools_onto_a_full_disk_without_raising(small_disk: Path) -> None:
    metrics = AgentMetrics("n1")
    spool = Spool(small_disk / "spool", segment_bytes=8 * 1024)
    settings = KafkaSettings(bootstrap="127.0.0.1:9")   # nothing listens: every frame ends in the spool
    sink = KafkaSink(settings, "n1", spool, metrics, max_in_flight=8, stall_after_ms=100)
    framer = Framer("n1", max_events=10)
    events = [pb.Event(http=pb.HttpRequest(start_ns=10**18 + i, pid=1, method="GET", path="/x" * 100))
              for i in range(3000)]
    for frame in framer.add(events, 0):
        sink.send(frame)
        sink.poll()
        time.sleep(0.002)
    sink.close(timeout_s=0.5)                            # 8 frames in flight that the disk cannot keep
    dropped = metrics._dropped.labels("n1", "spool_write_error")._value.get()
    print(f"spooled {sink.spooled_frames} frames, dropped for the full disk {dropped:.0f}")
    assert sink.spooled_frames > 0 and dropped > 0
    kept = Spool(small_disk / "spool")
    assert kept.frames == len(kept.read(10_000)) > 0     # whatever was kept reads back whole
    kept.close()
