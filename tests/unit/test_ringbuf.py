"""MappedRing reads the BPF ring-buffer layout: positions, busy and discarded records, padding,
wrap-around and the budget. A memfd stands in for the map: consumer page, producer page, then
the data area once (the reader joins the two pieces of a wrapped record itself)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from probe_agent.ringbuf import MappedRing

PAGE = mmap.PAGESIZE
SIZE = PAGE  # one page of data
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    def __init__(self) -> None:
        self.fd = os.memfd_create("weft-ring-test")
        os.ftruncate(self.fd, 2 * PAGE + SIZE)
        self.data = bytearray(SIZE)
        self.producer = 0

    def put(self, payload: bytes, flags: int = 0) -> None:
        at = self.producer & (SIZE - 1)
        record = struct.pack("<II", len(payload) | flags, 0) + payload
        record += bytes(-len(record) % 8)
        for i, b in enumerate(record):
            self.data[(at + i) % SIZE] = b
        self.producer += len(record)
        self.sync()

    def sync(self) -> None:
        os.pwrite(self.fd, struct.pack("<Q", self.producer), PAGE)
        os.pwrite(self.fd, bytes(self.data), 2 * PAGE)

    def consumer(self) -> int:
        return int(struct.unpack("<Q", os.pread(self.fd, 8, 0))[0])


@pytest.fixture()
def fake() -> Iterator[FakeRing]:
    ring = FakeRing()
    yield ring
    os.close(ring.fd)


def test_reads_in_order_skips_discarded_and_stops_at_a_busy_record(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    fake.put(b"one")
    fake.put(b"dropped", DISCARD)
    fake.put(b"three33")
    assert ring.read(100) == ([b"one", b"three33"], True)
    assert fake.consumer() == fake.producer
    fake.put(b"busy", BUSY)
    fake.put(b"after")
    assert ring.read(100) == ([], False)  # the busy record holds back the ones behind it
    ring.close()


def test_budget_and_wrap_around(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    payloads = [bytes([i % 251]) * (40 + i % 23) for i in range(300)]  # wraps the page 3 times
    got: list[bytes] = []
    for chunk in range(0, len(payloads), 10):
        for p in payloads[chunk:chunk + 10]:
            fake.put(p)
        first, drained = ring.read(4)
        assert len(first) == 4 and not drained
        rest, drained = ring.read(100)
        assert drained
        got += first + rest
    assert got == payloads
    assert fake.consumer() == fake.producer
    ring.close()


def test_size_must_be_a_power_of_two(fake: FakeRing) -> None:
    with pytest.raises(ValueError, match="power of two"):
        MappedRing(fake.fd, 3 * PAGE)


def test_read_span_copies_whole_records_with_their_framing_and_joins_a_wrap(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    payloads = [bytes([i % 251]) * (40 + i % 23) for i in range(300)]  # wraps the page 3 times
    framed = [struct.pack("<II", len(p), 0) + p + bytes(-len(p) % 8) for p in payloads]
    spans: list[bytes] = []
    for chunk in range(0, len(payloads), 10):
        for p in payloads[chunk:chunk + 10]:
            fake.put(p)
        first, n, drained = ring.read_span(4)
        assert n == 4 and not drained
        rest, n, drained = ring.read_span(100)
        assert n == 6 and drained
        spans += [first, rest]
    assert b"".join(spans) == b"".join(framed)
    assert fake.consumer() == fake.producer
    ring.close()


def test_read_span_keeps_discarded_records_and_stops_at_a_busy_one(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    fake.put(b"one")
    fake.put(b"dropped", DISCARD)
    fake.put(b"busy", BUSY)
    fake.put(b"after")
    span, n, drained = ring.read_span(100)
    assert n == 2 and not drained
    assert span == struct.pack("<II", 3, 0) + b"one" + bytes(5) + \
        struct.pack("<II", 7 | DISCARD, 0) + b"dropped" + bytes(1)
    assert ring.read_span(100) == (b"", 0, False)  # the busy record holds back the ones behind it
    ring.close()


def test_read_stride_takes_same_size_records_by_arithmetic_and_joins_a_wrap(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    payloads = [bytes([i % 251]) * 44 for i in range(300)]  # 56-byte stride: wraps the page
    framed = [struct.pack("<II", 44, 0) + p + bytes(4) for p in payloads]
    spans: list[bytes] = []
    for chunk in range(0, len(payloads), 10):
        for p in payloads[chunk:chunk + 10]:
            fake.put(p)
        first, n, drained = ring.read_stride(4, 44)
        assert n == 4 and not drained
        rest, n, drained = ring.read_stride(100, 44)
        assert n == 6 and drained
        spans += [first, rest]
    assert b"".join(spans) == b"".join(framed)
    assert fake.consumer() == fake.producer
    ring.close()


def test_read_stride_stops_at_a_busy_record(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    for payload in (b"a" * 44, b"b" * 44):
        fake.put(payload)
    fake.put(b"c" * 44, BUSY)
    fake.put(b"d" * 44)
    span, n, drained = ring.read_stride(100, 44)
    assert n == 2 and not drained and span == b"".join(
        struct.pack("<II", 44, 0) + p * 44 + bytes(4) for p in (b"a", b"b"))
    assert ring.read_stride(100, 44) == (b"", 0, False)  # the busy record holds back the next one
    ring.close()


def test_read_stride_falls_back_to_the_record_walk_for_other_sizes(fake: FakeRing) -> None:
    ring = MappedRing(fake.fd, SIZE)
    fake.put(b"x" * 44)
    fake.put(b"odd one")          # another size: the span is walked record by record
    fake.put(b"y" * 44, DISCARD)  # same size, discarded: walked too
    span, n, drained = ring.read_stride(100, 44)
    assert n == 3 and drained
    assert span == (struct.pack("<II", 44, 0) + b"x" * 44 + bytes(4) + struct.pack("<II", 7, 0) + b"odd one"
                    + bytes(1) + struct.pack("<II", 44 | DISCARD, 0) + b"y" * 44 + bytes(4))
    ring.close()
