"""Spool: bounded, in order, drops counted above the limit, survives a restart of the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from probe_agent.spool import Spool


def payload(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "little") * (size // 4)


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while records := spool.read(batch):
        for data, pos in records:
            out.append(data)
            spool.commit(pos)
    return out


def test_fifo_across_segments_and_segments_removed_once_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    for i in range(50):
        assert spool.append(payload(i))
    assert spool.frames == 50
    assert len(list(tmp_path.glob("seg-*.wsp"))) >= 5
    assert drain(spool) == [payload(i) for i in range(50)]
    assert spool.empty and spool.size_bytes == 0
    assert len(list(tmp_path.glob("seg-*.wsp"))) <= 1
    spool.append(payload(99))
    assert drain(spool) == [payload(99)]


def test_bounded_drops_are_counted_and_nothing_below_the_limit_is_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10 * 108, segment_bytes=300)
    accepted = [i for i in range(25) if spool.append(payload(i))]
    assert accepted == list(range(10))
    assert (spool.dropped_frames, spool.dropped_bytes) == (15, 1500)
    assert spool.size_bytes == 10 * 108
    assert drain(spool) == [payload(i) for i in accepted]
    assert spool.append(payload(77))  # room again after the drain


def test_uncommitted_reads_are_read_again_after_rewind(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=250)
    for i in range(6):
        spool.append(payload(i))
    first = spool.read(4)
    spool.commit(first[1][1])  # Kafka acknowledged two of the four
    spool.rewind()              # the other two failed
    assert [d for d, _ in spool.read(10)] == [payload(i) for i in range(2, 6)]


def test_prepend_goes_before_everything_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=250)
    for i in range(10, 15):
        spool.append(payload(i))
    (_, pos), = spool.read(1)
    spool.commit(pos)          # 10 is gone
    spool.prepend([payload(1), payload(2)])
    spool.append(payload(15))
    assert spool.frames == 7
    assert drain(spool) == [payload(i) for i in (1, 2, 11, 12, 13, 14, 15)]


_WRITER = """
import sys
from probe_agent.spool import Spool
spool = Spool(sys.argv[1], segment_bytes=500)
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    spool.append(i.to_bytes(4, "little") * 25)
# commit the first three, then die without closing anything
for _, pos in spool.read(3):
    spool.commit(pos)
import os
os._exit(0)
"""


def test_survives_a_restart_of_the_process_including_a_torn_tail(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), "0", "20"], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    last = max(tmp_path.glob("seg-*.wsp"))
    with open(last, "ab") as fh:          # a crash in the middle of writing a record
        fh.write(b"\x40\x00\x00\x00\x01\x02")
    spool = Spool(tmp_path, segment_bytes=500)
    assert spool.frames == 17
    spool.append(payload(20))
    assert drain(spool) == [payload(i) for i in range(3, 21)]
    spool.close()
    assert Spool(tmp_path).empty
