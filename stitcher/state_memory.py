"""MemoryStateStore: the dict-backed StateStore used by `weft rebuild` and the tests.

Same merge semantics as the Redis store (see stitcher/engine/store.py); no TTL, because an
offline rebuild is finite. It is a DirectStateStore: the engine reads and writes it in place.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence, Set
from types import MappingProxyType

from stitcher.engine.store import FLOOR_LIMIT, DirectStateStore, Floor, Op, Snapshot, StateStore

_EMPTY_HASH: Mapping[str, str] = MappingProxyType({})
_EMPTY_SET: frozenset[str] = frozenset()


class _Hashes(dict[str, dict[str, str]]):
    """Hash keys; an absent key reads as the empty hash (not stored): `hashes[key]` is then the
    whole `hget`, a lookup in C instead of a Python call per read."""

    def __missing__(self, key: str) -> Mapping[str, str]:
        return _EMPTY_HASH


class _Sets(dict[str, set[str]]):
    """Set keys; an absent key reads as the empty set (not stored), as `_Hashes`."""

    def __missing__(self, key: str) -> Set[str]:
        return _EMPTY_SET


class MemoryStateStore(DirectStateStore):
    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = _Hashes()
        self.sets: dict[str, set[str]] = _Sets()
        self.zsets: dict[str, list[tuple[int, str]]] = {}   # sorted by (score, member)
        # the engine reads these a few million times in a rebuild: bound C lookups, not methods
        self.hget = self.hashes.__getitem__  # type: ignore[method-assign,assignment]
        self.smembers = self.sets.__getitem__  # type: ignore[method-assign,assignment]

    def hget(self, key: str) -> Mapping[str, str]:
        return self.hashes.get(key) or _EMPTY_HASH

    def smembers(self, key: str) -> Set[str]:
        return self.sets.get(key) or _EMPTY_SET

    def zfloor(self, key: str, score: int) -> list[tuple[int, str]]:
        entries = self.zsets.get(key)
        if not entries:
            return []
        end = bisect.bisect_right(entries, (score, "\U0010ffff"))
        if end > FLOOR_LIMIT:                  # one reversed slice (no copy to reverse)
            return entries[end - 1:end - FLOOR_LIMIT - 1:-1]
        return entries[end - 1::-1] if end else []

    def hsetnx(self, key: str, field: str, value: str) -> None:
        current = self.hashes.get(key)
        if current is None:
            self.hashes[key] = {field: value}
        elif field not in current:
            current[field] = value

    def hmin(self, key: str, field: str, value: str) -> None:
        current = self.hashes.setdefault(key, {})
        old = current.get(field)
        if old is None or value < old:
            current[field] = value

    def hmax(self, key: str, field: str, value: str) -> None:
        current = self.hashes.setdefault(key, {})
        old = current.get(field)
        if old is None or value > old:
            current[field] = value

    def sadd(self, key: str, members: tuple[str, ...]) -> None:
        bucket = self.sets.get(key)
        if bucket is None:
            self.sets[key] = set(members)
        else:
            bucket.update(members)

    def srem(self, key: str, members: tuple[str, ...]) -> None:
        bucket = self.sets.get(key)
        if bucket is not None:
            bucket.difference_update(members)
            if not bucket:
                del self.sets[key]

    def zadd(self, key: str, score: int, member: str) -> None:
        entries = self.zsets.get(key)
        entry = (score, member)
        if entries is None:
            self.zsets[key] = [entry]
        elif entry > entries[-1]:
            entries.append(entry)                # the common case: time moves forward
        else:
            i = bisect.bisect_left(entries, entry)
            if i == len(entries) or entries[i] != entry:
                entries.insert(i, entry)         # the engine never gives one member two scores

    def delete(self, key: str) -> None:
        self.hashes.pop(key, None)
        self.sets.pop(key, None)
        self.zsets.pop(key, None)

    def key_count(self) -> int:
        return len(self.hashes) + len(self.sets) + len(self.zsets)


class BatchedMemoryStateStore(StateStore):
    """The memory store seen only through `load`/`apply`, as the engine sees a network store
    (Redis): it runs the engine's batched path (preloads, read-your-writes, one batch per
    frame) without a server. Loads return copies, like a network store."""

    fresh_loads = True

    def __init__(self) -> None:
        self.inner = MemoryStateStore()
        self.loads = 0
        self.batches = 0

    def load(self, hashes: Sequence[str] = (), sets: Sequence[str] = (),
             floors: Sequence[Floor] = ()) -> Snapshot:
        self.loads += 1
        return self.inner.load(hashes, sets, floors)

    def apply(self, ops: Sequence[Op]) -> None:
        self.batches += 1
        self.inner.apply(ops)
