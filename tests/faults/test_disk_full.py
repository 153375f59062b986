"""The agent on a disk that fills up (a real tmpfs of 64 KiB).

* Spool: frames that do not fit are dropped and counted with the reason, nothing torn is left
  behind, the spool takes frames again once there is room, and the Kafka sink never raises — not
  while spooling, and not at exit when the frames librdkafka still holds cannot be kept.
* Capture file: the file is cut back to its last whole frame and the agent stops, detaching
  everything, with one sentence (a capture that goes on writing nothing helps nobody)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.framer import Framer
from probe_agent.metrics import AgentMetrics
from probe_agent.sinks import CaptureSink, KafkaSink
from probe_agent.spool import Spool
from schemas import weft_events_pb2 as pb
from schemas.codec import read_capture
from tests.integration.test_agent_capture import agent_prog_ids, loaded_prog_ids
from weft.config import KafkaSettings

WEFT = str(Path(sys.executable).with_name("weft"))


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


def _frames(n_events: int) -> list[pb.Frame]:
    events = [pb.Event(http=pb.HttpRequest(start_ns=10**18 + i, pid=1, method="GET", path="/x" * 100))
              for i in range(n_events)]
    return Framer("n1", max_events=10).add(events, 0)


def test_a_capture_file_on_a_full_disk_is_cut_to_whole_frames_and_the_sink_says_why(
        small_disk: Path) -> None:
    metrics = AgentMetrics("n1")
    path = small_disk / "c.wcap"
    sink = CaptureSink(path, "n1", metrics)
    sent = 0
    for frame in _frames(3000):
        sink.send(frame)
        sink.poll()
        sent += 1
        if sink.failure:
            break
    assert sink.failure, "the disk never filled"
    kept = len(list(read_capture(path)))               # reads back whole: no torn frame at the end
    assert sink.failure == (f"cannot write capture file {path}: No space left on device; it keeps the "
                            f"{kept} frames written before, whole ({sent - kept} lost)")
    sink.send(_frames(10)[0])                           # later frames: dropped, counted, no raise
    sink.close()
    assert metrics._dropped.labels("n1", "capture_write_error")._value.get() == sent - kept + 1
    assert len(list(read_capture(path))) == kept


@pytest.mark.bpf
def test_an_agent_whose_capture_disk_fills_stops_and_says_so(small_disk: Path, tmp_path: Path) -> None:
    capture = small_disk / "c.wcap"
    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        agent = subprocess.Popen([WEFT, "agent", "--node", "full", "--capture", str(capture)],
                                 stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run")})
    try:
        deadline = time.monotonic() + 120
        while "weft agent full:" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        held = agent_prog_ids(agent.pid)
        for _ in range(100):                            # process lineage events until the disk is full
            if agent.poll() is not None:
                break
            subprocess.run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"], check=True)
        code = agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    out = log.read_text()
    kept = len(list(read_capture(capture)))             # reads back whole
    last = out.rstrip().splitlines()[-1]
    assert code == 1, out[-2000:]
    assert last.startswith(f"weft agent: cannot write capture file {capture}: No space left on device; "
                           f"it keeps the {kept} frames written before, whole ("), out[-2000:]
    assert "Traceback" not in out
    deadline = time.monotonic() + 5                      # programs are freed asynchronously (RCU)
    while held & loaded_prog_ids():
        assert time.monotonic() < deadline, f"programs {held & loaded_prog_ids()} still loaded"
        time.sleep(0.1)


def test_a_batch_command_whose_output_disk_fills_says_so_in_one_sentence(small_disk: Path,
                                                                         tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    subprocess.run([WEFT, "simulate", "--nodes", "3", "--rps", "50", "--seconds", "2",
                    "--capture-dir", str(captures)], check=True, capture_output=True, timeout=120)
    out = small_disk / "out.jsonl"
    done = subprocess.run([WEFT, "rebuild", *map(str, sorted(captures.glob("*.wcap"))), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write {out}: No space left on device; what was written before is incomplete")
