"""The engine's stored form of an HTTP event (records.Http): what it keeps of the agent's
event, and that state written by an older stitcher still reads back."""

from __future__ import annotations

import pytest

from schemas import weft_events_pb2 as pb
from stitcher.engine import events as E
from stitcher.engine.records import SEP, Http


def _event(version: str = "") -> pb.HttpRequest:
    return E.http("server", pid=7, tid=8, start=1_000, end=2_000, cookie=9, local=("10.0.0.1", 80),
                  remote=("10.0.0.2", 40000), seq=1234, path="/a", host="svc", version=version).http


@pytest.mark.parametrize(("flags", "version"), [
    (pb.HTTP_FLAG_HTTP_1_1, "1.1"),
    (pb.HTTP_FLAG_HTTP_1_0, "1.0"),
    (pb.HTTP_FLAG_HTTP_1_1 | pb.HTTP_FLAG_PIPELINED | pb.HTTP_FLAG_PATH_TRUNCATED, "1.1"),
    (0, ""),                                               # another version, or an older agent
    (pb.HTTP_FLAG_HTTP_1_0 | pb.HTTP_FLAG_HTTP_1_1, ""),   # never sent: not a version
])
def test_the_version_is_read_from_the_agents_flags(flags: int, version: str) -> None:
    msg = _event()
    msg.flags = flags
    assert Http.from_pb("n1", msg).version == version


def test_a_record_reads_back_as_it_was_stored() -> None:
    rec = Http.from_pb("n1", _event("1.0"))
    assert Http.decode(rec.encode()) == rec
    assert rec.encode().split(SEP)[-1] == "1.0"


def test_a_record_stored_by_a_stitcher_without_versions_reads_back_without_one() -> None:
    """Join state outlives a rolling upgrade: the 20 fields an older stitcher wrote still decode."""
    rec = Http.from_pb("n1", _event("1.1"))
    older = SEP.join(rec.encode().split(SEP)[:20])
    assert Http.decode(older) == rec._replace(version="")
