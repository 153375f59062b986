"""What a frame holds once its raw records are decompressed: privacy checks must search these
bytes, since LZ4 blocks hide (and may split) any text they carry."""

from __future__ import annotations

from schemas import records
from schemas import weft_events_pb2 as pb


def plain_wire_bytes(payload: bytes) -> bytes:
    """`payload` (one encoded frame) re-encoded with every raw event's records stored plain."""
    frame = pb.Frame.FromString(payload)
    for event in frame.events:
        if event.HasField("raw") and event.raw.compression != pb.RECORDS_PLAIN:
            event.raw.records = records.plain_records(event.raw)
            event.raw.compression = pb.RECORDS_PLAIN
            event.raw.plain_size = 0
    return frame.SerializeToString()
