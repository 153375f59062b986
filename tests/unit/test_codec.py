"""schemas/codec.py: golden vectors, capture round trip, and errors that name the offset."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from schemas import weft_events_pb2 as pb
from schemas.codec import (
    CAPTURE_MAGIC,
    EVENT_KINDS,
    CaptureReader,
    CaptureWriter,
    CodecError,
    decode_frame,
    encode_frame,
    make_frame,
    read_capture,
    wrap,
)
from tests.golden import make_golden

GOLDEN = Path(make_golden.__file__).parent


def _as_dict(message: Message) -> object:
    return MessageToDict(message, preserving_proto_field_name=True)


def _unset_fields(message: Message, prefix: str = "") -> list[str]:
    """Names of fields left at their default, recursively (oneof siblings excepted)."""
    unset = []
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None:
            continue
        name = f"{prefix}{field.name}"
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                unset += [] if len(value) else [name]
            elif not message.HasField(field.name):
                unset.append(name)
            else:
                unset += _unset_fields(value, name + ".")
        elif value == field.default_value:
            unset.append(name)
    return unset


def test_sample_has_every_kind_with_every_field_set() -> None:
    events = make_golden.sample_events_current()
    assert [e.WhichOneof("kind") for e in events] == list(EVENT_KINDS)
    for event in events:
        body = getattr(event, event.WhichOneof("kind"))
        assert _unset_fields(body) == [], event.WhichOneof("kind")


# --- golden vectors: today's decoder reads the committed bytes to the committed values ----------


def test_golden_frame_decodes_to_the_expected_values() -> None:
    expected = json.loads((GOLDEN / "golden_v1.json").read_text())
    frame = decode_frame((GOLDEN / "frame_v1.bin").read_bytes())
    assert _as_dict(frame) == expected["frame_v1.bin"]
    assert frame.events[6].http.tracestate == "vendor=opaque,ünïcode=✓"
    assert frame.events[4].conn_open.tuple.remote_addr == bytes.fromhex("fd00000000000000000000000000abcd")
    assert frame.events[6].http.tcp_seq == 0xFFFF_FFFE


def test_golden_capture_reads_to_the_expected_values() -> None:
    expected = json.loads((GOLDEN / "golden_v1.json").read_text())["golden_v1.wcap"]
    reader = CaptureReader(GOLDEN / "golden_v1.wcap")
    assert _as_dict(reader.header) == expected["header"]
    assert [_as_dict(f) for f in reader.frames()] == expected["frames"]


def test_golden_files_are_reproduced_by_their_generator(tmp_path: Path) -> None:
    # If this fails, the v1 sample changed: keep the v1 files and add a v2 generator instead.
    for written in make_golden.write(tmp_path):
        assert written.read_bytes() == (GOLDEN / written.name).read_bytes(), written.name


# --- capture files ------------------------------------------------------------------------------


def test_capture_written_and_read_back_is_identical(tmp_path: Path) -> None:
    frames = [make_frame(f"node-{i % 3}", make_golden.sample_events(), agent_instance=99, seq=i)
              for i in range(20)]
    path = tmp_path / "t.wcap"
    with CaptureWriter(path, node="", producer="test") as writer:
        for frame in frames:
            writer.write(frame)
    assert writer.frames == 20
    assert list(read_capture(path)) == frames
    reader = CaptureReader(path)
    assert [r.payload for r in reader.records()] == [encode_frame(f) for f in frames]
    assert reader.header.producer == "test" and reader.header.schema_version == 1
    # Rewriting what was read gives the same frames again.
    copy = tmp_path / "copy.wcap"
    with CaptureWriter(copy) as writer:
        for frame in read_capture(path):
            writer.write(frame)
    assert list(read_capture(copy)) == frames


def test_frame_round_trip_and_time_range() -> None:
    frame = make_frame("n", make_golden.sample_events_current())
    assert decode_frame(encode_frame(frame)) == frame
    assert frame.t_min_ns == make_golden.T0 and frame.t_max_ns == make_golden.T0 + 1000


def _golden_capture() -> bytes:
    return (GOLDEN / "golden_v1.wcap").read_bytes()


def _record_offsets(data: bytes) -> list[int]:
    offsets, pos = [], len(CAPTURE_MAGIC)
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + struct.unpack_from("<I", data, pos)[0]
    return offsets


def _reads(tmp_path: Path, data: bytes) -> list[pb.Frame]:
    path = tmp_path / "bad.wcap"
    path.write_bytes(data)
    return list(read_capture(path))


def test_flipped_payload_byte_names_the_record_offset(tmp_path: Path) -> None:
    data = bytearray(_golden_capture())
    second_frame = _record_offsets(bytes(data))[2]
    data[second_frame + 8 + 3] ^= 0xFF
    with pytest.raises(CodecError) as err:
        _reads(tmp_path, bytes(data))
    assert err.value.offset == second_frame and "checksum" in err.value.reason
    assert f"at byte {second_frame}" in str(err.value) and "bad.wcap" in str(err.value)


def test_truncated_capture_names_the_offset(tmp_path: Path) -> None:
    data = _golden_capture()
    last = _record_offsets(data)[-1]
    with pytest.raises(CodecError) as err:
        _reads(tmp_path, data[:-5])
    assert err.value.offset == last and "truncated" in err.value.reason
    with pytest.raises(CodecError) as err:
        _reads(tmp_path, data[: last + 3])
    assert err.value.offset == last and "truncated record header" in err.value.reason


def test_bad_magic_and_foreign_schema_version(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="bad magic"):
        _reads(tmp_path, b"NOTWEFT\n" + _golden_capture()[8:])
    future = make_frame("n", [wrap(pb.Watermark(ts_ns=1))])
    future.schema_version = 99
    payload = encode_frame(future)
    with pytest.raises(CodecError, match="schema version 99 is not supported"):
        decode_frame(payload)
    data = _golden_capture() + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    with pytest.raises(CodecError) as err:
        _reads(tmp_path, data)
    assert err.value.offset == len(_golden_capture())


def test_frame_errors_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="not a Weft frame"):
        decode_frame(b"\xff\xff\xff")
    with pytest.raises(CodecError, match="names no node"):
        decode_frame(encode_frame(pb.Frame(schema_version=1)))
    with pytest.raises(CodecError, match="inverted"):
        decode_frame(encode_frame(pb.Frame(schema_version=1, node="n", t_min_ns=2, t_max_ns=1)))
    with pytest.raises(CodecError, match="no kind"):
        decode_frame(encode_frame(pb.Frame(schema_version=1, node="n", events=[pb.Event()])))
