"""Read a BPF ring buffer map straight from its memory mapping, a batch of records per call.

BCC's `ring_buffer_consume` calls back into Python once per record, through a ctypes trampoline
and BCC's own wrapper, and the callback must copy the record out with `ctypes.string_at`: a few
microseconds per record before any decoding, at one or two records per traced request. This
reader does what libbpf's `ring_buffer__consume` does, in a Python loop: the map's first page
holds the consumer position (ours to write), the next page the producer position, and then the
data area. The kernel offers the data area twice in a row (so that a record that wraps around
the end is contiguous); this reader maps it once and joins the two pieces of a wrapped record
itself: every mapped page counts in the agent's RSS (the kernel maps them all at mmap time).
Each record starts with an 8-byte header: its length (bit 31: still being written, bit 30:
discarded) and a page offset; records are padded to 8 bytes, so a header never wraps.

Ordering: the kernel publishes a record by clearing its busy bit with a store-release after
writing the data; a reader needs loads that are not reordered, which x86's memory model gives
plain loads. On other architectures `usable()` says no and the runner keeps BCC's reader.
"""

from __future__ import annotations

import array
import mmap
import platform
import struct

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_COMMIT_EVERY = 256  # hand space back to the kernel while a long batch is read


def framed_size(record_size: int) -> int:
    """Bytes a record takes in the ring: the 8-byte header and the record, padded to 8 (the
    per-record loops below spell this out inline: a call per record would cost more)."""
    return (record_size + _HEADER + 7) & ~7


def usable() -> bool:
    """Plain loads are ordered enough to read a ring the kernel writes (x86 only)."""
    return platform.machine() in ("x86_64", "AMD64", "i686")


class MappedRing:
    """One BPF_MAP_TYPE_RINGBUF map of `size` bytes (a power of two), given its fd."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._page = page
        self._mask = size - 1
        self._end = page + size  # one past the data area, in the second mapping
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._data = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        except BaseException:
            self._consumer.close()
            raise

    def read(self, budget: int) -> tuple[list[bytes], bool]:
        """Up to `budget` records (copied out, in order); True when the ring is now empty
        (as far as the producer had gone when this call looked)."""
        consumer, data, page, mask, data_end = (self._consumer, self._data, self._page, self._mask,
                                                self._end)
        (pos,) = _U64.unpack_from(consumer, 0)
        (end,) = _U64.unpack_from(data, 0)
        out: list[bytes] = []
        uncommitted = 0
        while pos < end and len(out) < budget:
            at = page + (pos & mask)
            (length,) = _U32.unpack_from(data, at)
            if length & _BUSY:
                break  # reserved, not yet submitted: later records wait behind it
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                start, stop = at + _HEADER, at + _HEADER + size
                if stop <= data_end:
                    out.append(data[start:stop])
                else:  # wraps: its tail is at the start of the data area
                    out.append(data[start:data_end] + data[page:page + stop - data_end])
            pos += (size + _HEADER + 7) & ~7
            uncommitted += 1
            if uncommitted == _COMMIT_EVERY:
                _U64.pack_into(consumer, 0, pos)
                uncommitted = 0
        _U64.pack_into(consumer, 0, pos)
        return out, pos >= end

    def read_span(self, budget: int) -> tuple[bytes, int, bool]:
        """Up to `budget` records as one copy of the ring's bytes, framing included (each
        record: u32 length | u32 page offset | data | pad to 8; see schemas/records.py), the
        number of records in it (discarded ones included), and True when the ring is now empty.
        The headers are read first, one by one; the span is copied only after: every record in
        it was submitted before the copy began."""
        consumer, data, page, mask, data_end = (self._consumer, self._data, self._page, self._mask,
                                                self._end)
        (pos,) = _U64.unpack_from(consumer, 0)
        (end,) = _U64.unpack_from(data, 0)
        first, n = pos, 0
        unpack = _U32.unpack_from
        while pos < end and n < budget:
            (length,) = unpack(data, page + (pos & mask))
            if length & _BUSY:
                break  # reserved, not yet submitted: later records wait behind it
            pos += ((length & ~(_BUSY | _DISCARD)) + _HEADER + 7) & ~7
            n += 1
        if n == 0:
            return b"", 0, pos >= end
        start, stop = page + (first & mask), page + (first & mask) + (pos - first)
        if stop <= data_end:
            span = data[start:stop]
        else:  # wraps: the rest is at the start of the data area
            span = data[start:data_end] + data[page:page + stop - data_end]
        _U64.pack_into(consumer, 0, pos)
        return span, n, pos >= end

    def read_stride(self, budget: int, record_size: int) -> tuple[bytes, int, bool]:
        """`read_span` for a ring whose records all have `record_size` bytes: the span is cut by
        arithmetic and the length words are checked as one array, so the cost does not grow with
        the number of records in Python. Falls back to `read_span` when the ring holds anything
        else (a record of another size, or a discarded one)."""
        stride = framed_size(record_size)
        consumer, data, page, mask, data_end = (self._consumer, self._data, self._page, self._mask,
                                                self._end)
        (pos,) = _U64.unpack_from(consumer, 0)
        (end,) = _U64.unpack_from(data, 0)
        if (end - pos) % stride:
            return self.read_span(budget)
        n = min((end - pos) // stride, budget)
        if n == 0:
            return b"", 0, pos >= end
        start = page + (pos & mask)
        stop = start + n * stride
        if stop <= data_end:
            span = data[start:stop]
        else:  # wraps: the rest is at the start of the data area
            span = data[start:data_end] + data[page:page + stop - data_end]
        lengths = array.array("I", span)[:: stride // 4]
        if lengths.count(record_size) != n:
            # a record still being written ends the span (later ones wait behind it)
            try:
                n = lengths.index(record_size | _BUSY)
            except ValueError:
                return self.read_span(budget)
            if lengths[:n].count(record_size) != n:
                return self.read_span(budget)
            span = span[: n * stride]
        _U64.pack_into(consumer, 0, pos + n * stride)
        return span, n, pos + n * stride >= end

    def close(self) -> None:
        self._data.close()
        self._consumer.close()
