"""Raw kernel records in frames (schema v2): golden vectors pin each record layout per ABI
version, and the codec expands RawRecords events into exactly the events decoding record by
record gives, in place, or refuses the frame with a CodecError.

The golden records are written here byte by byte at their documented offsets (not with the
struct formats under test): a layout change in schemas/records.py without a new ABI version
(and new vectors) fails these tests."""

from __future__ import annotations

import socket

import pytest
from google.protobuf import text_format

from schemas import records
from schemas import weft_events_pb2 as pb
from schemas.codec import (
    RAW_SCHEMA_VERSION,
    CodecError,
    decode_frame,
    encode_frame,
)

OFFSET = 1_700_000_000_000_000_000  # ktime -> Unix


def put(buf: bytearray, off: int, value: int | bytes, width: int = 0) -> None:
    if isinstance(value, bytes):
        buf[off:off + len(value)] = value
    else:
        buf[off:off + width] = value.to_bytes(width, "little")


def header(buf: bytearray, kind: int, ts: int, pid: int, tid: int, version: int = 1) -> None:
    put(buf, 0, ts, 8)
    put(buf, 8, 0xC0FFEE, 8)  # cgroup id
    put(buf, 16, pid, 4)
    put(buf, 20, tid, 4)
    put(buf, 24, kind, 2)
    put(buf, 26, version, 2)


def tuple_at(buf: bytearray, off: int, role: int, mid: int = 0) -> None:
    put(buf, off, socket.inet_aton("10.0.0.1"))
    put(buf, off + 16, socket.inet_aton("10.0.0.2"))
    put(buf, off + 32, 8080, 2)
    put(buf, off + 34, 40000, 2)
    put(buf, off + 36, 2, 1)  # AF_INET
    put(buf, off + 37, role, 1)
    put(buf, off + 38, mid, 1)


def golden_http_v1() -> bytes:
    buf = bytearray(512)
    header(buf, 6, 900, 10, 11)  # an HTTP record's header time is its start
    put(buf, 32, 0xABCDEF, 8)  # sock cookie
    tuple_at(buf, 40, role=1)
    r = 80  # struct req
    put(buf, r, 900, 8)  # start
    put(buf, r + 8, 1_900, 8)  # end
    put(buf, r + 16, 10, 4)
    put(buf, r + 20, 12, 4)
    put(buf, r + 24, 0xFFFFFFF0, 4)  # seq
    put(buf, r + 28, 404, 2)
    put(buf, r + 30, 1, 1)  # has_seq
    put(buf, r + 31, 0x80 | 4, 1)  # flags: internal mark + pipelined
    for i, n in enumerate((4, 5, 4, 3, 2)):  # method, path, host, tp, ts lengths
        put(buf, r + 32 + i, n, 1)
    put(buf, r + 40, b"POST")
    put(buf, r + 48, b"/cart/stale-tail-bytes")  # past path_len: unspecified, ignored
    put(buf, r + 176, b"shop")
    put(buf, r + 240, b"tp!")
    put(buf, r + 296, b"ts")
    put(buf, r + 360, 77, 8)  # goid
    put(buf, 448, 5, 8)  # tpctx serial
    put(buf, 456, b"4bf92f3577b34da6a3ce929d0e0e4736")
    put(buf, 488, b"00f067aa0ba902b7")
    put(buf, 504, 1, 1)  # assigned
    return bytes(buf)


def golden_conn_v1(kind: int) -> bytes:
    buf = bytearray(96)
    header(buf, kind, 2_000, 20, 21)
    put(buf, 32, 0x1234, 8)
    put(buf, 40, 300, 8)
    put(buf, 48, 400, 8)
    tuple_at(buf, 56, role=2, mid=1)
    return bytes(buf)


def golden_go_spawn_v1() -> bytes:
    buf = bytearray(48)
    header(buf, 7, 3_000, 30, 31)
    put(buf, 32, 1, 8)
    put(buf, 40, 2, 8)
    return bytes(buf)


def golden_lost_http_v1() -> bytes:
    buf = bytearray(104)
    header(buf, 8, 7_000, 70, 71)  # header time: the lost request's start
    put(buf, 32, 0x5678, 8)  # sock cookie
    put(buf, 40, 7_500, 8)  # end
    put(buf, 48, 99, 8)  # goid
    put(buf, 56, 0xFFFFFF00, 4)  # seq
    put(buf, 60, 1, 1)  # has_seq
    tuple_at(buf, 64, role=1)
    return bytes(buf)


def golden_thread_spawn_v1() -> bytes:
    buf = bytearray(40)
    header(buf, 1, 4_000, 40, 41)
    put(buf, 32, 42, 4)
    put(buf, 36, 43, 4)
    return bytes(buf)


def golden_exit_v1() -> bytes:
    buf = bytearray(32)
    header(buf, 2, 5_000, 50, 51)
    return bytes(buf)


def golden_exec_v1() -> bytes:
    buf = bytearray(176)
    header(buf, 3, 6_000, 60, 60)
    put(buf, 32, 500, 8)  # start_ns
    put(buf, 40, 1, 4)  # ppid
    put(buf, 44, 13, 4)  # filename length
    put(buf, 48, b"/usr/bin/curl")
    return bytes(buf)


TUPLE_TEXT = ('tuple { local_addr: "\\n\\000\\000\\001" local_port: 8080 '
              'remote_addr: "\\n\\000\\000\\002" remote_port: 40000 }')

# (record, the event it decodes to with OFFSET), per ABI version. A new ABI version adds its
# own vectors; the current one must have them.
GOLDEN: dict[int, list[tuple[str, bytes, str]]] = {
    1: [
        ("http", golden_http_v1(),
         f'http {{ role: ROLE_SERVER start_ns: {OFFSET + 900} end_ns: {OFFSET + 1_900} pid: 10 '
         f'tid: 12 goid: 77 sock_cookie: 11259375 {TUPLE_TEXT} tcp_seq: 4294967280 has_seq: true '
         'method: "POST" path: "/cart" host: "shop" traceparent: "tp!" tracestate: "ts" '
         'status: 404 flags: 4 assigned_traceparent: '
         '"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" }'),
        ("conn_open", golden_conn_v1(4),
         f'conn_open {{ ts_ns: {OFFSET + 2_000} pid: 20 tid: 21 sock_cookie: 4660 '
         f'role: ROLE_CLIENT {TUPLE_TEXT} seen_mid_stream: true }}'),
        ("conn_close", golden_conn_v1(5),
         f'conn_close {{ ts_ns: {OFFSET + 2_000} pid: 20 tid: 21 sock_cookie: 4660 '
         f'role: ROLE_CLIENT {TUPLE_TEXT} bytes_sent: 300 bytes_received: 400 }}'),
        ("goroutine_spawn", golden_go_spawn_v1(),
         f'goroutine_spawn {{ ts_ns: {OFFSET + 3_000} pid: 30 tid: 31 parent_goid: 1 child_goid: 2 }}'),
        ("lost_http", golden_lost_http_v1(),
         f'lost_http {{ role: ROLE_SERVER start_ns: {OFFSET + 7_000} end_ns: {OFFSET + 7_500} pid: 70 '
         f'tid: 71 goid: 99 sock_cookie: 22136 {TUPLE_TEXT} tcp_seq: 4294967040 has_seq: true }}'),
        ("thread_spawn", golden_thread_spawn_v1(),
         f'thread_spawn {{ ts_ns: {OFFSET + 4_000} parent_pid: 40 parent_tid: 41 child_pid: 42 '
         'child_tid: 43 new_process: true }'),
        ("task_exit", golden_exit_v1(), f'task_exit {{ ts_ns: {OFFSET + 5_000} pid: 50 tid: 51 }}'),
        ("process", golden_exec_v1(),
         f'process {{ ts_ns: {OFFSET + 6_000} pid: 60 ppid: 1 exe: "curl" service_name: "curl" '
         f'cgroup_id: 12648430 start_ns: {OFFSET + 500} }}'),
    ],
}


def event(text: str) -> pb.Event:
    return text_format.Parse(text, pb.Event())


def test_every_supported_abi_version_has_golden_vectors_for_every_kind() -> None:
    assert records.ABI_VERSION in records.SUPPORTED_ABI_VERSIONS
    for version in records.SUPPORTED_ABI_VERSIONS:
        kinds = {name for name, _, _ in GOLDEN[version]}
        assert kinds == set(records.EVENT_KIND_OF.values()), version


@pytest.mark.parametrize(("name", "raw", "expected"), GOLDEN[records.ABI_VERSION],
                         ids=[name for name, _, _ in GOLDEN[records.ABI_VERSION]])
def test_golden_record_decodes_to_exact_event(name: str, raw: bytes, expected: str) -> None:
    assert records.RECORD_SIZES[next(k for k, v in records.EVENT_KIND_OF.items() if v == name)] == len(raw)
    assert records.decode(raw, OFFSET) == [event(expected)]


def test_records_of_another_abi_version_or_too_short_are_refused() -> None:
    raw = bytearray(golden_go_spawn_v1())
    put(raw, 26, 2, 2)
    with pytest.raises(records.AbiError, match="ABI version 2"):
        records.decode(bytes(raw), 0)
    with pytest.raises(records.AbiError, match="expected 48"):
        records.decode(golden_go_spawn_v1()[:40], 0)
    with pytest.raises(records.AbiError, match="header"):
        records.decode(b"\0" * 8, 0)


def raw_event(recs: list[bytes], offset: int = OFFSET, count: int | None = None,
              abi: int = records.ABI_VERSION, blob: bytes | None = None) -> pb.Event:
    e = pb.Event()
    e.raw.abi_version = abi
    e.raw.ktime_offset_ns = offset
    e.raw.records = blob if blob is not None else b"".join(records.envelope_record(r) for r in recs)
    e.raw.count = len(recs) if count is None else count
    return e


def v2_frame(*events: pb.Event) -> bytes:
    frame = pb.Frame(schema_version=RAW_SCHEMA_VERSION, node="n1", agent_instance=7, seq=3,
                     t_min_ns=1, t_max_ns=9)
    frame.events.extend(events)
    return encode_frame(frame)


def test_raw_records_expand_in_place_into_the_per_record_events() -> None:
    golden = [raw for _, raw, _ in GOLDEN[1]]
    before = pb.Event(process=pb.ProcessInfo(pid=10, exe="srv"))
    mark = pb.Event(watermark=pb.Watermark(ts_ns=5))
    frame = decode_frame(v2_frame(before, raw_event(golden[:3]), mark, raw_event(golden[3:])))
    expected = [before, *(records.decode(r, OFFSET)[0] for r in golden[:3]), mark,
                *(records.decode(r, OFFSET)[0] for r in golden[3:])]
    assert list(frame.events) == expected
    assert (frame.schema_version, frame.node, frame.agent_instance, frame.seq) == (2, "n1", 7, 3)
    assert (frame.t_min_ns, frame.t_max_ns) == (1, 9)


def test_envelope_framing_is_the_ring_buffers_and_discarded_records_are_skipped() -> None:
    go, conn = golden_go_spawn_v1(), golden_conn_v1(4)
    discarded = records.ENVELOPE_HEAD.pack(len(conn) | records.DISCARDED, 0) + conn
    blob = records.envelope_record(go) + discarded + records.envelope_record(conn)
    assert records.envelope_record(go)[:8] == (48).to_bytes(4, "little") + bytes(4)
    assert len(records.envelope_record(b"x" * 33)) == 8 + 40  # padded to 8
    (frame_event,) = decode_frame(v2_frame(raw_event([], blob=blob, count=2))).events[:1]
    assert frame_event.WhichOneof("kind") == "goroutine_spawn"
    assert len(decode_frame(v2_frame(raw_event([], blob=blob, count=2))).events) == 2


@pytest.mark.parametrize(("bad", "reason"), [
    (raw_event([golden_http_v1()], count=2), "say 2 records"),
    (raw_event([], blob=records.envelope_record(golden_http_v1())[:300], count=1), "claims 512"),
    (raw_event([golden_http_v1()], abi=9), "ABI version 9"),
    (raw_event([golden_http_v1()[:100]]), "expected 512"),
])
def test_a_bad_raw_event_fails_the_frame_with_a_codec_error(bad: pb.Event, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_frame(v2_frame(bad))


def test_raw_records_are_refused_in_a_v1_frame() -> None:
    frame = pb.Frame(schema_version=1, node="n1")
    frame.events.append(raw_event([golden_go_spawn_v1()]))
    with pytest.raises(CodecError, match="raw records in a schema v1 frame"):
        decode_frame(encode_frame(frame))


def lz4_event(recs: list[bytes]) -> pb.Event:
    e = raw_event(recs)
    records.compress_records(e.raw, e.raw.records)
    return e


def test_lz4_records_expand_to_exactly_what_plain_records_do() -> None:
    golden = [raw for _, raw, _ in GOLDEN[1]]
    packed = lz4_event(golden)
    assert packed.raw.compression == pb.RECORDS_LZ4_BLOCK
    assert packed.raw.plain_size == len(raw_event(golden).raw.records) > len(packed.raw.records)
    assert decode_frame(v2_frame(packed)) == decode_frame(v2_frame(raw_event(golden)))


def _tampered(**fields: object) -> pb.Event:
    e = lz4_event([golden_http_v1(), golden_conn_v1(4)])
    for name, value in fields.items():
        setattr(e.raw, name, value)
    return e


@pytest.mark.parametrize(("bad", "reason"), [
    (_tampered(records=b"\xff" * 40), "corrupt LZ4 block"),
    (_tampered(plain_size=1 << 30), "more than"),
    (_tampered(compression=7), "unknown method 7"),
])
def test_a_bad_lz4_raw_event_fails_the_frame_with_a_codec_error(bad: pb.Event, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_frame(v2_frame(bad))
