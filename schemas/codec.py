"""Encode and decode Weft frames, on the wire (Kafka) and in capture files.

Wire: one Kafka message value is one serialized `Frame` (see weft_events.proto).

Schema versions: v1 frames carry schema events only. v2 frames may also carry `RawRecords`
events, kernel records as the kernel wrote them (schemas/records.py); `decode_frame` expands
each, in place, into the schema events its records decode to, so readers see v1-shaped frames
either way. Frames without raw records are still written as v1.

Capture file (format "weft-capture", version 1), all integers little-endian:

    magic     8 bytes  b"WEFTCAP\\n"
    header    record   a serialized CaptureHeader
    frames    record*  serialized Frames, in the order written

    record := u32 length | u32 crc32(payload) | payload[length]

A reader names the byte offset of the first bad record; nothing in a malformed input can crash
it with anything but `CodecError`.
"""

from __future__ import annotations

import contextlib
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from google.protobuf.message import DecodeError as _PbDecodeError

from schemas import weft_events_pb2 as pb
from schemas.records import AbiError, expand

SCHEMA_VERSION = 1
RAW_SCHEMA_VERSION = 2  # frames that may hold RawRecords events
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})
CAPTURE_MAGIC = b"WEFTCAP\n"
CAPTURE_FORMAT = "weft-capture"
CAPTURE_FORMAT_VERSION = 1
MAX_RECORD_BYTES = 64 << 20
RAW_KIND = "raw"  # the envelope: never in a decoded frame
EVENT_KINDS: tuple[str, ...] = tuple(f.name for f in pb.Event.DESCRIPTOR.oneofs_by_name["kind"].fields
                                     if f.name != RAW_KIND)

_RECORD_HEAD = struct.Struct("<II")


class CodecError(ValueError):
    """Bytes that are not a valid Weft frame or capture file; `offset` is where it went wrong."""

    def __init__(self, reason: str, offset: int = 0, source: str = "") -> None:
        self.reason = reason
        self.offset = offset
        self.source = source
        where = f"{source} at byte {offset}" if source else f"at byte {offset}"
        super().__init__(f"{where}: {reason}")


def wrap(message: object) -> pb.Event:
    """Put one event-kind message (pb.HttpRequest, pb.Watermark, ...) into an Event."""
    event = pb.Event()
    field = _FIELD_BY_TYPE.get(type(message))
    if field is None:
        raise TypeError(f"{type(message).__name__} is not a Weft event kind")
    getattr(event, field).CopyFrom(message)
    return event


_FIELD_BY_TYPE: dict[type, str] = {
    getattr(pb, f.message_type.name): f.name
    for f in pb.Event.DESCRIPTOR.oneofs_by_name["kind"].fields
    if f.message_type is not None and f.name != RAW_KIND
}


def event_time_ns(event: pb.Event) -> int:
    """The time an event is ordered by: its ts_ns, or an HTTP request's start (lost or not)."""
    kind = event.WhichOneof("kind")
    if kind is None:
        return 0
    body = getattr(event, kind)
    return int(body.start_ns if kind in REQUEST_KINDS else body.ts_ns)


REQUEST_KINDS = frozenset({"http", "lost_http"})


def make_frame(node: str, events: list[pb.Event], *, agent_instance: int = 0, seq: int = 0) -> pb.Frame:
    """A frame of `events` for `node`, with its time range filled in."""
    frame = pb.Frame(schema_version=SCHEMA_VERSION, node=node, agent_instance=agent_instance, seq=seq)
    frame.events.extend(events)
    times = [event_time_ns(e) for e in events]
    if times:
        frame.t_min_ns, frame.t_max_ns = min(times), max(times)
    return frame


def encode_frame(frame: pb.Frame) -> bytes:
    return frame.SerializeToString(deterministic=True)


def validate_frame(frame: pb.Frame, source: str = "") -> None:
    """Raise CodecError when a parsed frame breaks the contract."""
    if frame.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CodecError(
            f"schema version {frame.schema_version} is not supported "
            f"(this build reads {sorted(SUPPORTED_SCHEMA_VERSIONS)})", 0, source)
    if not frame.node:
        raise CodecError("frame names no node", 0, source)
    if frame.t_min_ns > frame.t_max_ns:
        raise CodecError(f"frame time range is inverted ({frame.t_min_ns} > {frame.t_max_ns})",
                         0, source)
    for i, event in enumerate(frame.events):
        kind = event.WhichOneof("kind")
        if kind is None:
            raise CodecError(f"event {i} has no kind this build knows", 0, source)
        if kind == RAW_KIND and frame.schema_version < RAW_SCHEMA_VERSION:
            raise CodecError(f"event {i} holds raw records in a schema v{frame.schema_version} frame",
                             0, source)


def decode_frame(data: bytes, source: str = "") -> pb.Frame:
    """Parse and validate one frame, its raw records expanded; any failure is a CodecError."""
    frame = pb.Frame()
    try:
        frame.ParseFromString(data)
    except (_PbDecodeError, RecursionError, ValueError) as exc:
        raise CodecError(f"not a Weft frame ({exc})", 0, source) from None
    validate_frame(frame, source)
    if frame.schema_version >= RAW_SCHEMA_VERSION:
        frame = expand_raw(frame, source)
    return frame


def expand_raw(frame: pb.Frame, source: str = "") -> pb.Frame:
    """The frame with each RawRecords event replaced, in place, by the events its records decode
    to (the frame itself when it holds none)."""
    events = frame.events
    if not any(e.HasField("raw") for e in events):
        return frame
    out = pb.Frame(schema_version=frame.schema_version, node=frame.node,
                   agent_instance=frame.agent_instance, seq=frame.seq,
                   t_min_ns=frame.t_min_ns, t_max_ns=frame.t_max_ns)
    out_events = out.events
    for i, event in enumerate(events):
        if not event.HasField("raw"):
            out_events.append(event)
            continue
        try:
            expand(event.raw, add=out_events.add)
        except AbiError as exc:
            raise CodecError(f"event {i}: {exc}", 0, source) from None
    return out


# ---------------------------------------------------------------------------------------------
# Capture files


def _record(payload: bytes) -> bytes:
    return _RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


class CaptureWriter:
    """Append frames to a capture file; usable as a context manager."""

    def __init__(self, path: str | Path, *, node: str = "", producer: str = "weft",
                 schema_version: int = SCHEMA_VERSION) -> None:
        """`schema_version`: the newest frame schema the file may hold (RAW_SCHEMA_VERSION
        when frames may carry raw records)."""
        self.path = Path(path)
        self._fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        header = pb.CaptureHeader(format=CAPTURE_FORMAT, format_version=CAPTURE_FORMAT_VERSION,
                                  schema_version=schema_version, node=node,
                                  created_ns=time.time_ns(), producer=producer)
        self._fh.write(CAPTURE_MAGIC + _record(header.SerializeToString(deterministic=True)))
        self.frames = 0

    def write(self, frame: pb.Frame) -> None:
        self.write_encoded(encode_frame(frame))

    def write_encoded(self, payload: bytes) -> None:
        # head and payload apart: a frame of raw records is large, a joined copy costs
        self._fh.write(_RECORD_HEAD.pack(len(payload), zlib.crc32(payload)))
        self._fh.write(payload)
        self.frames += 1

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        """Bytes written so far (flushed or buffered)."""
        return self._fh.tell()

    def close(self, discard: bool = False) -> None:
        """Flush and close; with `discard`, a failing flush is ignored (after the disk refused a
        write: the file is closed all the same, and the caller cuts off what is not whole)."""
        if self._fh.closed:
            return
        if discard:
            with contextlib.suppress(OSError):
                self._fh.close()
            return
        self._fh.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class CaptureRecord:
    offset: int       # byte offset of the record's length field
    payload: bytes    # the serialized frame


class CaptureReader:
    """Read a capture file: `.header`, then iterate `frames()` (or raw `records()`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data = self.path.read_bytes()
        self._source = str(self.path)
        if not self._data.startswith(CAPTURE_MAGIC):
            raise CodecError("not a Weft capture file (bad magic)", 0, self._source)
        self._pos = len(CAPTURE_MAGIC)
        rec = self._next_record()
        if rec is None:
            raise CodecError("capture file has no header", self._pos, self._source)
        header = pb.CaptureHeader()
        try:
            header.ParseFromString(rec.payload)
        except _PbDecodeError as exc:
            raise CodecError(f"bad capture header ({exc})", rec.offset, self._source) from None
        if header.format != CAPTURE_FORMAT or header.format_version != CAPTURE_FORMAT_VERSION:
            raise CodecError(f"unsupported capture format {header.format!r} "
                             f"v{header.format_version}", rec.offset, self._source)
        if header.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise CodecError(f"capture schema version {header.schema_version} is not supported",
                             rec.offset, self._source)
        self.header = header
        self._first = self._pos

    def _next_record(self) -> CaptureRecord | None:
        data, pos = self._data, self._pos
        if pos == len(data):
            return None
        if pos + _RECORD_HEAD.size > len(data):
            raise CodecError("truncated record header", pos, self._source)
        length, crc = _RECORD_HEAD.unpack_from(data, pos)
        if length > MAX_RECORD_BYTES:
            raise CodecError(f"record length {length} exceeds {MAX_RECORD_BYTES}", pos,
                             self._source)
        start = pos + _RECORD_HEAD.size
        payload = data[start:start + length]
        if len(payload) != length:
            raise CodecError(f"truncated record: {len(payload)} of {length} bytes", pos,
                             self._source)
        if zlib.crc32(payload) != crc:
            raise CodecError("record checksum mismatch", pos, self._source)
        self._pos = start + length
        return CaptureRecord(pos, payload)

    def records(self) -> Iterator[CaptureRecord]:
        self._pos = self._first
        while (rec := self._next_record()) is not None:
            yield rec

    def frames(self) -> Iterator[pb.Frame]:
        for rec in self.records():
            try:
                yield decode_frame(rec.payload, self._source)
            except CodecError as exc:
                raise CodecError(exc.reason, rec.offset, self._source) from None


def read_capture(path: str | Path) -> Iterator[pb.Frame]:
    """All frames of a capture file, in order."""
    yield from CaptureReader(path).frames()
