"""One fuzz input → the event decoder and the join engine; shared by the hypothesis test and the
atheris run of `make soak`.

`check_input(data)` does two things with the bytes:
  1. decodes them as a frame: a CodecError is the expected refusal, anything else a crash;
  2. reads them as a recipe (`_Recipe`) for a few frames of two nodes over a small domain of
     pids, threads, sockets, ports, sequence numbers and times (so joins, lineage, duplicates,
     backwards watermarks and bad traceparents really happen), round-trips each frame through
     the codec — also after flipping one byte — and stitches what decodes with a fresh engine,
     then flushes it. Any exception there is a crash of the engine.
It returns None, or a crash signature "<stage>: <exception type> at <file>:<line>".
"""

from __future__ import annotations

import traceback

from schemas import weft_events_pb2 as pb
from schemas.codec import CodecError, decode_frame, encode_frame, make_frame
from stitcher.engine import Engine
from stitcher.engine import events as ev
from stitcher.state_memory import MemoryStateStore

T0 = 1_760_000_000 * 1_000_000_000
MS = 1_000_000
NODES = ("node-a", "node-b")
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
PATHS = ("/", "/a", "/b?x=1", "", "/\x1f\x00", "/" + "p" * 300)
TRACEPARENTS = ("", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "00-zz-yy-01",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "garbage",
                "00-" + "0" * 32 + "-" + "0" * 16 + "-00")
STATUSES = (200, 500, 0, 999)


class _Recipe:
    """Reads small choices off the fuzz bytes; zeros once they run out (deterministic)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.byte() % len(options)]

    def small(self, n: int) -> int:
        return self.byte() % n

    def time(self) -> int:
        return T0 + (self.byte() << 8 | self.byte()) * MS // 16

    @property
    def left(self) -> bool:
        return self.pos < len(self.data)


def _event(r: _Recipe) -> pb.Event:
    kind = r.small(8)
    pid, tid = 1 + r.small(3), 1 + r.small(4)
    if kind <= 3:
        start = r.time()
        end = start + r.small(200) * MS - 20 * MS          # sometimes end < start
        seq = None if r.small(4) == 0 else r.small(8)
        local, remote = (r.pick(IPS), 8000 + r.small(3)), (r.pick(IPS), 40000 + r.small(3))
        return ev.http("server" if kind % 2 else "client", pid=pid, tid=tid, start=start, end=end,
                       cookie=r.small(6), local=local, remote=remote, seq=seq, path=r.pick(PATHS),
                       traceparent=r.pick(TRACEPARENTS), injected=r.pick(TRACEPARENTS)[:r.small(60)],
                       status=STATUSES[r.small(len(STATUSES))], goid=r.small(3))
    if kind == 4:
        return ev.thread_spawn(pid, tid, 1 + r.small(4), r.time())
    if kind == 5:
        return ev.task_exit(pid, tid, r.time())
    if kind == 6:
        return ev.goroutine_spawn(pid, r.small(3), r.small(3), r.time(), tid)
    if r.small(2):
        return ev.process(pid, r.pick(("svc", "", "a\x1fb")), "exe", r.time(), r.pick(("", "go", "x")))
    return ev.watermark(r.time())


def _frames(data: bytes) -> list[pb.Frame]:
    r = _Recipe(data)
    frames: list[pb.Frame] = []
    while r.left and len(frames) < 8:
        events = [_event(r) for _ in range(1 + r.small(12))]
        frames.append(make_frame(r.pick(NODES), events, seq=len(frames)))
        if r.small(5) == 0:
            frames.append(frames[-1])                        # delivered twice
    return frames


def _signature(stage: str, exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{stage}: {type(exc).__name__} at {where.filename.rsplit('/', 2)[-1]}:{where.lineno}"


def check_input(data: bytes) -> str | None:
    try:
        decode_frame(data, "fuzz")
    except CodecError:
        pass
    except Exception as exc:  # the decoder must refuse with CodecError, never raise anything else
        return _signature("decode", exc)
    decoded: list[pb.Frame] = []
    for i, frame in enumerate(_frames(data)):
        raw = bytearray(encode_frame(frame))
        if raw and data and data[i % len(data)] % 3 == 0:    # flip a byte now and then
            raw[data[i % len(data)] % len(raw)] ^= 0xFF
        try:
            decoded.append(decode_frame(bytes(raw), "fuzz"))
        except CodecError:
            continue
        except Exception as exc:
            return _signature("decode", exc)
    engine = Engine(MemoryStateStore())
    engine.expect_nodes(NODES)
    try:
        for frame in decoded:
            engine.process(frame)
        engine.flush()
    except Exception as exc:
        return _signature("engine", exc)
    return None
