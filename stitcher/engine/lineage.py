"""Thread and goroutine ancestry inside one process, valid at a point in time.

Thread ids are reused after exit, so every lineage record carries its time: the thread `tid`
alive at time x is the incarnation started by its latest spawn (or seen after its latest exit)
before x, and only requests that incarnation served count. Thread records live in a
sorted set per thread (`...:lin:<tid>`, score = µs, member "<ts>|s<parent tid>" or "<ts>|x")
queried by floor, so a reused tid costs one small read; goroutine records live per goroutine (`...:go:<goid>`:
"p" → "<parent goid>|<ts>"); goroutine ids are never reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from stitcher.engine.store import FLOOR_LIMIT


class Hop(NamedTuple):
    """One level of ancestry: requests on `ident` (tid or goid) that started at or after
    `since_ns` belong to this incarnation. For level ≥ 1, `spawned_at_ns` is when this
    ancestor created the level below: the request it served then is the one the spawned work
    belongs to (a pool thread created for an earlier request does not inherit later ones).
    A named tuple: one is made per client and level, and a frozen dataclass costs twice as much."""

    ident: int
    since_ns: int
    level: int
    spawned_at_ns: int = 0


def lineage_member(ts_ns: int, parent_tid: int | None) -> tuple[int, str]:
    """(score, member) of a thread record: a spawn by `parent_tid`, or an exit (None)."""
    kind = "x" if parent_tid is None else f"s{parent_tid}"
    return ts_ns // 1000, f"{ts_ns:020d}|{kind}"


def thread_incarnation(records: list[tuple[int, str]], at_ns: int) -> tuple[int, int | None]:
    """(since, parent tid or None) of the thread alive at `at_ns`, from the thread's latest
    lineage records at or before it (a floor query, highest first)."""
    for _, member in records:
        ts_s, kind = member.split("|")
        ts = int(ts_s)
        if ts > at_ns:
            continue                 # same microsecond, but after at_ns
        if kind[0] == "s":
            return ts, int(kind[1:])
        return ts, None              # exited before: a reused tid whose spawn we never saw
    return 0, None


def goroutine_parent(fields: Mapping[str, str]) -> tuple[int, int] | None:
    """(parent goid, spawn time) of a goroutine, if its `go` statement was seen."""
    record = fields.get("p")
    if record is None:
        return None
    parent_s, ts_s = record.split("|", 1)
    return int(parent_s), int(ts_s)


def incarnation_end(records: list[tuple[int, str]], alive_at_ns: int, by_ns: int
                    ) -> tuple[int | None, bool]:
    """(end, exact) of the thread incarnation alive at `alive_at_ns`, from a floor query at
    `by_ns` (highest first): its end is its next lineage record (an exit, or a spawn of the
    reused tid) in (alive_at_ns, by_ns], None when there is none. `exact` is False when the
    floor was full of later records, so the earliest may be missing: `end` is then only an
    upper bound of the true end."""
    end = None
    for _, member in records:
        ts = int(member.split("|", 1)[0])
        if ts <= alive_at_ns:
            return end, True
        if ts <= by_ns:
            end = ts
    return end, len(records) < FLOOR_LIMIT


def ended_by(records: list[tuple[int, str]], alive_at_ns: int, at_ns: int) -> bool:
    """Whether the incarnation alive at `alive_at_ns` had ended by `at_ns`, from a floor
    query at `at_ns` (highest first): its top record at or before `at_ns` is a later one."""
    for _, member in records:
        ts = int(member.split("|", 1)[0])
        if ts <= at_ns:
            return ts > alive_at_ns
    return False
