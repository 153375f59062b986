"""A bounded on-disk FIFO of encoded frames, used while Kafka is unreachable.

Layout of the spool directory:

    seg-<n>.wsp   segment files, numbered in order; records appended to the highest one
    head          "<segment> <offset>": the first record not yet acknowledged by Kafka

    record := u32 length | u32 crc32(payload) | payload        (little-endian)

Reading and acknowledging are separate: `read()` hands out records from a read cursor, and
`commit(pos)` moves the durable head once Kafka acknowledged them, so a process that dies mid-drain
sends those frames again after restart (at least once; frames carry (node, agent_instance, seq)).
A torn record at the end of the last segment (crash while writing) is cut off on open.

Bounded: when the unacknowledged bytes would exceed `max_bytes`, or the disk refuses a write
(full, I/O error), the new frame is dropped and counted, never raised; a partly written record is
cut off at once. `prepend()` puts frames in front of everything (used at shutdown for
frames librdkafka still held, which are older than anything spooled).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<II")
_FIRST_SEGMENT = 1_000_000_000  # room below for prepend()


class SpoolWriteError(OSError):
    """Frames handed to prepend() could not be written; they are counted as dropped."""


@dataclass(frozen=True, order=True)
class SpoolPos:
    """Position just after a record: committing it acknowledges that record and all before."""

    segment: int
    offset: int


def _seg_name(n: int) -> str:
    return f"seg-{n:012d}.wsp"


class Spool:
    def __init__(self, directory: str | Path, *, max_bytes: int = 256 << 20,
                 segment_bytes: int = 4 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dropped_frames = 0
        self.dropped_bytes = 0
        self.refused = ""                          # why the last dropped frame was dropped
        self.head_errors = 0                       # failed writes of the head file
        self._sizes: dict[int, int] = {}           # segment number → bytes on disk
        for path in self.dir.glob("seg-*.wsp"):
            self._sizes[int(path.stem[4:])] = path.stat().st_size
        self._head = self._load_head()
        for n in [n for n in self._sizes if n < self._head.segment]:
            self._remove_segment(n)                   # fully acknowledged before a crash
        if self._sizes:
            self._repair_tail(max(self._sizes))
        self._writer: BinaryIO | None = None
        self._writer_seg = -1
        self._read = self._head
        self._reader: BinaryIO | None = None
        self._reader_seg = -1
        self.frames = self._count_frames()         # records not yet acknowledged

    # -- state ------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of records not yet acknowledged."""
        return sum(self._sizes.values()) - (self._head.offset if self._head.segment in self._sizes
                                            else 0)

    @property
    def empty(self) -> bool:
        return self.frames == 0

    @property
    def unread(self) -> bool:
        """Records exist past the read cursor."""
        return self._next_readable() is not None

    # -- writing ----------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Queue one frame at the end; False (counted, and `refused` says why) when the spool is
        full or its disk refuses the write (no space left, I/O error): the frame is dropped and
        the spool stays readable."""
        size = _HEAD.size + len(payload)
        if self.size_bytes + size > self.max_bytes:
            return self._drop(payload, "full")
        tail = max(self._sizes) if self._sizes else max(_FIRST_SEGMENT, self._head.segment)
        if self._sizes.get(tail, 0) >= self.segment_bytes:
            tail += 1
        try:
            fh = self._writer_for(tail)
            fh.write(_HEAD.pack(len(payload), zlib.crc32(payload)) + payload)
            fh.flush()  # to the page cache: survives a crash of this process, not of the machine
        except OSError as exc:
            self._undo_write(tail)
            return self._drop(payload, f"cannot write {self.dir}: {exc.strerror or exc}")
        self._sizes[tail] = self._sizes.get(tail, 0) + size
        self.frames += 1
        return True

    def _drop(self, payload: bytes, why: str) -> bool:
        self.dropped_frames += 1
        self.dropped_bytes += len(payload)
        self.refused = why
        return False

    def _undo_write(self, n: int) -> None:
        """After a failed write: forget the writer (its buffer may hold part of the record) and
        cut segment n back to its last whole record, so nothing torn is left to read."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()      # flushing the rest fails too: the disk said no
            self._writer = None
            self._writer_seg = -1
        path = self.dir / _seg_name(n)
        with contextlib.suppress(OSError):
            if path.exists():
                os.truncate(path, self._sizes.get(n, 0))

    def prepend(self, payloads: list[bytes]) -> None:
        """Put frames in front of everything spooled (in the given order), ignoring the bound:
        they were already accepted once and dropping them now would lose data silently."""
        if not payloads:
            return
        self._close_reader()
        self._compact_head_segment()
        first = min([*self._sizes, self._head.segment]) - 1
        path = self.dir / _seg_name(first)
        try:
            with open(path, "wb") as fh:
                for payload in payloads:
                    fh.write(_HEAD.pack(len(payload), zlib.crc32(payload)) + payload)
        except OSError as exc:
            path.unlink(missing_ok=True)
            for payload in payloads:
                self._drop(payload, f"cannot write {self.dir}: {exc.strerror or exc}")
            raise SpoolWriteError(f"{len(payloads)} frames could not be kept in {self.dir}: "
                                  f"{exc.strerror or exc}") from exc
        self._sizes[first] = path.stat().st_size
        self.frames += len(payloads)
        self._set_head(SpoolPos(first, 0))
        self._read = self._head

    # -- reading ----------------------------------------------------------------------------

    def read(self, max_frames: int) -> list[tuple[bytes, SpoolPos]]:
        """Up to `max_frames` records after the read cursor, oldest first, with their positions."""
        out: list[tuple[bytes, SpoolPos]] = []
        while len(out) < max_frames:
            pos = self._next_readable()
            if pos is None:
                break
            fh = self._reader_for(pos.segment)
            fh.seek(pos.offset)
            head = fh.read(_HEAD.size)
            length, crc = _HEAD.unpack(head)
            payload = fh.read(length)
            if len(payload) != length or zlib.crc32(payload) != crc:
                # Only a bug or outside tampering gets here (torn tails are cut on open).
                logger.error("spool %s: bad record at %s/%d; skipping the rest of that segment",
                             self.dir, _seg_name(pos.segment), pos.offset)
                self._read = SpoolPos(pos.segment, self._sizes[pos.segment])
                continue
            self._read = SpoolPos(pos.segment, pos.offset + _HEAD.size + length)
            out.append((payload, self._read))
        return out

    def rewind(self) -> None:
        """Read again from the durable head (after a failed send of records already read)."""
        self._read = self._head

    def commit(self, pos: SpoolPos, frames: int = 1) -> None:
        """Kafka acknowledged everything up to `pos` (`frames` records since the last commit)."""
        if pos <= self._head:
            return
        for n in [n for n in self._sizes if n < pos.segment]:
            self._remove_segment(n)
        self.frames = max(0, self.frames - frames)
        if (pos.segment in self._sizes and pos.offset >= self._sizes[pos.segment]
                and pos.segment != max(self._sizes)):
            self._remove_segment(pos.segment)
            pos = SpoolPos(min(self._sizes), 0)
        self._set_head(pos)
        if self._read < self._head:
            self._read = self._head

    def close(self) -> None:
        self._close_reader()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- internals --------------------------------------------------------------------------

    def _next_readable(self) -> SpoolPos | None:
        pos = self._read
        while True:
            size = self._sizes.get(pos.segment)
            if size is not None and pos.offset < size:
                return pos
            later = [n for n in self._sizes if n > pos.segment]
            if not later:
                return None
            pos = SpoolPos(min(later), 0)
            self._read = pos

    def _writer_for(self, n: int) -> BinaryIO:
        if self._writer_seg != n or self._writer is None:
            if self._writer is not None:
                self._writer.close()
            self._writer = open(self.dir / _seg_name(n), "ab")  # noqa: SIM115 - closed in close()
            self._writer_seg = n
        return self._writer

    def _reader_for(self, n: int) -> BinaryIO:
        if self._reader_seg != n or self._reader is None:
            self._close_reader()
            self._reader = open(self.dir / _seg_name(n), "rb")  # noqa: SIM115 - closed in close()
            self._reader_seg = n
        return self._reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self._reader_seg = -1

    def _remove_segment(self, n: int) -> None:
        if n == self._reader_seg:
            self._close_reader()
        if n == self._writer_seg and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._writer_seg = -1
        (self.dir / _seg_name(n)).unlink(missing_ok=True)
        self._sizes.pop(n, None)

    def _load_head(self) -> SpoolPos:
        try:
            seg, off = (self.dir / "head").read_text().split()
            head = SpoolPos(int(seg), int(off))
        except (OSError, ValueError):
            head = SpoolPos(min(self._sizes) if self._sizes else _FIRST_SEGMENT, 0)
        if head.segment not in self._sizes:
            # Its segment is gone (fully acknowledged): start at the next one, from its start.
            later = [n for n in self._sizes if n > head.segment]
            head = SpoolPos(min(later) if later else head.segment, 0)
        return head

    def _set_head(self, pos: SpoolPos) -> None:
        self._head = pos
        tmp = self.dir / "head.tmp"
        try:
            tmp.write_text(f"{pos.segment} {pos.offset}\n")
            os.replace(tmp, self.dir / "head")
        except OSError as exc:
            # The durable head stays behind: after a restart those frames are sent again (at
            # least once, as after a crash; the stitcher drops the duplicates).
            self.head_errors += 1
            if self.head_errors == 1 or self.head_errors % 1000 == 0:
                logger.error("spool %s: cannot record the acknowledged position (%s); frames since "
                             "will be sent again after a restart (%d times so far)", self.dir,
                             exc.strerror or exc, self.head_errors)

    def _repair_tail(self, n: int) -> None:
        """Cut a torn record off the end of segment n."""
        path = self.dir / _seg_name(n)
        good = 0
        with open(path, "rb") as fh:
            data = fh.read()
        while good + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, good)
            end = good + _HEAD.size + length
            if end > len(data) or zlib.crc32(data[good + _HEAD.size:end]) != crc:
                break
            good = end
        if good != len(data):
            logger.warning("spool %s: cut %d torn bytes off %s", self.dir, len(data) - good, path.name)
            with open(path, "r+b") as fh:
                fh.truncate(good)
            self._sizes[n] = good

    def _compact_head_segment(self) -> None:
        """Rewrite the head segment without its acknowledged records, so reading it starts at 0."""
        seg, off = self._head.segment, self._head.offset
        if off == 0 or seg not in self._sizes:
            return
        if seg == self._writer_seg and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._writer_seg = -1
        path = self.dir / _seg_name(seg)
        rest = path.read_bytes()[off:]
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(rest)
        os.replace(tmp, path)
        self._sizes[seg] = len(rest)
        self._set_head(SpoolPos(seg, 0))

    def _count_frames(self) -> int:
        count = 0
        for n in sorted(self._sizes):
            start = self._head.offset if n == self._head.segment else 0
            with open(self.dir / _seg_name(n), "rb") as fh:
                fh.seek(start)
                pos, size = start, self._sizes[n]
                while pos + _HEAD.size <= size:
                    length, _ = _HEAD.unpack(fh.read(_HEAD.size))
                    fh.seek(length, os.SEEK_CUR)
                    pos += _HEAD.size + length
                    count += 1
        return count
