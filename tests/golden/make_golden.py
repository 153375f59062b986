"""Golden vectors of schema v1: `python -m tests.golden.make_golden` writes them next to this file.

Deterministic (fixed values, fixed capture creation time), so rerunning it reproduces the committed
bytes exactly. The capture file is written here by hand from the format documented in
schemas/codec.py, not with CaptureWriter, so the golden test checks the reader against the
documented format rather than against the writer. When schema v2 comes, add make_golden_v2 and
keep these files: later versions must still read them.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from schemas import weft_events_pb2 as pb
from schemas.codec import encode_frame, make_frame, wrap

HERE = Path(__file__).parent
FRAME_FILE = HERE / "frame_v1.bin"
CAPTURE_FILE = HERE / "golden_v1.wcap"
EXPECTED_FILE = HERE / "golden_v1.json"
CAPTURE_CREATED_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
T0 = 1_767_225_600_123_456_789


def _tuple(last_octet: int, port: int) -> pb.Tuple:
    return pb.Tuple(local_addr=bytes([10, 203, 0, last_octet]), local_port=port,
                    remote_addr=bytes.fromhex("fd00000000000000000000000000abcd"), remote_port=8080)


def sample_events() -> list[pb.Event]:
    """One event of every kind, every field set to a non-default value."""
    bodies = [
        pb.ProcessInfo(ts_ns=T0, pid=4242, ppid=1, exe="python3.11", service_name="checkout",
                       cgroup_id=9_876_543_210, start_ns=T0 - 5_000_000_000),
        pb.ThreadSpawn(ts_ns=T0 + 1, parent_pid=4242, parent_tid=4242, child_pid=4242, child_tid=4250,
                       new_process=True),
        pb.TaskExit(ts_ns=T0 + 2, pid=4242, tid=4250),
        pb.GoroutineSpawn(ts_ns=T0 + 3, pid=5151, tid=5153, parent_goid=17, child_goid=4_294_967_301),
        pb.ConnectionOpen(ts_ns=T0 + 4, pid=4242, tid=4243, sock_cookie=0xFFFF_0000_1234_5678,
                          role=pb.ROLE_CLIENT, tuple=_tuple(2, 40_001), seen_mid_stream=True),
        pb.ConnectionClose(ts_ns=T0 + 5, pid=4242, tid=4243, sock_cookie=0xFFFF_0000_1234_5678,
                           role=pb.ROLE_SERVER, tuple=_tuple(3, 40_002), bytes_sent=2**40 + 3,
                           bytes_received=77),
        pb.HttpRequest(role=pb.ROLE_SERVER, start_ns=T0 + 6, end_ns=T0 + 906, pid=4242, tid=4244,
                       goid=9, sock_cookie=31337, tuple=_tuple(4, 80), tcp_seq=0xFFFF_FFFE, has_seq=True,
                       method="POST", path="/cart/items", host="shop.weft.test:8080",
                       traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                       tracestate="vendor=opaque,ünïcode=✓", status=503,
                       injected_traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                       flags=pb.HTTP_FLAG_PATH_TRUNCATED | pb.HTTP_FLAG_SEQ_ESTIMATED),
        pb.Watermark(ts_ns=T0 + 1000),
    ]
    return [wrap(body) for body in bodies]


def sample_events_current() -> list[pb.Event]:
    """The v1 sample plus the fields added to schema v1 since its golden files were written
    (additive, same SCHEMA_VERSION): every field of today's schema set. The golden files stay
    those of `sample_events()`; today's decoder must still read them."""
    events = sample_events()
    events[0].process.runtime = "go"    # ProcessInfo.runtime = 8
    events[0].process.resource_attributes["service.namespace"] = "shop"   # = 9
    events[6].http.assigned_traceparent = "00-0af7651916cd43dd8448eb211c80319c-5fb1c3a6e2d40b17-01"  # = 19
    events.append(wrap(pb.LostRequest(  # Event.lost_http = 10
        role=pb.ROLE_SERVER, start_ns=T0 + 7, end_ns=T0 + 707, pid=4242, tid=4245, goid=10,
        sock_cookie=31338, tuple=_tuple(5, 80), tcp_seq=0xFFFF_FFFD, has_seq=True)))
    events.append(wrap(pb.BlindSpan(ts_ns=T0 + 8, until_ns=T0 + 20_000_008, records=3)))  # = 11
    return events


def golden_frames() -> list[pb.Frame]:
    """The frames of the golden capture: every kind from node-a, then a watermark from node-b."""
    return [make_frame("node-a", sample_events(), agent_instance=0xDEAD_BEEF_CAFE, seq=7),
            make_frame("node-b", [wrap(pb.Watermark(ts_ns=T0 + 2000))], agent_instance=1, seq=0)]


def capture_header() -> pb.CaptureHeader:
    return pb.CaptureHeader(format="weft-capture", format_version=1, schema_version=1, node="",
                            created_ns=CAPTURE_CREATED_NS, producer="tests/golden/make_golden.py")


def _record(payload: bytes) -> bytes:
    """record := u32 length | u32 crc32(payload) | payload, little-endian (schemas/codec.py)."""
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def capture_bytes() -> bytes:
    records = [capture_header().SerializeToString(deterministic=True)]
    records += [encode_frame(frame) for frame in golden_frames()]
    return b"WEFTCAP\n" + b"".join(_record(r) for r in records)


def expected_json() -> str:
    def as_dict(message: object) -> object:
        return MessageToDict(message, preserving_proto_field_name=True)  # type: ignore[arg-type]

    doc = {"frame_v1.bin": as_dict(golden_frames()[0]),
           "golden_v1.wcap": {"header": as_dict(capture_header()),
                              "frames": [as_dict(f) for f in golden_frames()]}}
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = HERE) -> list[Path]:
    outputs = {directory / FRAME_FILE.name: encode_frame(golden_frames()[0]),
               directory / CAPTURE_FILE.name: capture_bytes(),
               directory / EXPECTED_FILE.name: expected_json().encode()}
    for path, data in outputs.items():
        path.write_bytes(data)
    return list(outputs)


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {written}")
