"""Txn: one frame's view of the store — batched loads, read-your-writes, one `apply` at the end.

The engine reads what it needs in a few batched `load` calls, and every write is recorded as a
merge op (sent to the store in one batch by `commit`) and also applied to the cached copy so
later reads in the same frame see it. Loaded containers are the store's (read-only by contract):
they are copied on the first write, unless the store made them for this load (`fresh_loads`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Set
from operator import itemgetter

from stitcher.engine.store import (
    FLOOR_LIMIT,
    Delete,
    DirectStateStore,
    Floor,
    HMax,
    HMin,
    HSetNX,
    Op,
    SAdd,
    SRem,
    StateStore,
    ZAdd,
)

_score = itemgetter(0)


class NotLoadedError(LookupError):
    """A floor the engine reads was not loaded while `Txn.only_loaded` is set: the caller
    collects these, loads them together in one round trip, and asks again."""

    def __init__(self, floor: Floor) -> None:
        super().__init__(floor)
        self.floor = floor


class Txn:
    batched = True    # loads matter: the engine names what it will read before reading it
    __slots__ = ("_f", "_h", "_owned", "_pending", "_s", "_z", "_zs", "only_loaded", "ops", "store")

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._h: dict[str, dict[str, str]] = {}
        self._s: dict[str, set[str]] = {}
        self._owned: set[str] = set()
        self._pending: dict[str, list[Op]] = {}
        self._f: dict[Floor, list[tuple[int, str]]] = {}
        self._z: dict[str, list[tuple[int, str]]] = {}      # this frame's ZAdds, not yet applied
        self._zs: dict[str, list[tuple[int, str]]] = {}     # the same, sorted (until the next ZAdd)
        self.ops: list[Op] = []
        self.only_loaded = False   # floor() raises NotLoadedError instead of loading one by one

    def load(self, hashes: Iterable[str] = (), sets: Iterable[str] = (),
             floors: Iterable[Floor] = ()) -> None:
        h, s, f = self._h, self._s, self._f
        need_h = [k for k in dict.fromkeys(hashes) if k not in h]
        need_s = [k for k in dict.fromkeys(sets) if k not in s]
        need_f = [k for k in dict.fromkeys(floors) if k not in f]
        if not need_h and not need_s and not need_f:
            return
        snap = self.store.load(need_h, need_s, need_f)
        h.update(snap.hashes)
        s.update(snap.sets)
        f.update(snap.floors)
        if self.store.fresh_loads:      # ours to write into: no copy on the first write
            self._owned.update(snap.hashes)
            self._owned.update(snap.sets)
        if self._pending:
            for key in (*need_h, *need_s):
                for op in self._pending.pop(key, ()):
                    self._merge(op)

    def hash(self, key: str) -> Mapping[str, str]:
        found = self._h.get(key)
        if found is None:
            self.load(hashes=(key,))
            found = self._h[key]
        return found

    def members(self, key: str) -> Set[str]:
        found = self._s.get(key)
        if found is None:
            self.load(sets=(key,))
            found = self._s[key]
        return found

    def floor(self, key: str, score: int) -> list[tuple[int, str]]:
        """Highest (score, member) entries with score ≤ `score`, this batch's writes included."""
        found = self._f.get((key, score))
        if found is None:
            found = self.store.local_floor(key, score)
            if found is not None:
                self._f[(key, score)] = found
            elif self.only_loaded:
                raise NotLoadedError((key, score))
            else:
                self.load(floors=((key, score),))
                found = self._f[(key, score)]
        if key not in self._z:
            return found
        # A batch of frames writes many entries to one lane or tuple key, and the sweep asks
        # for floors of them again and again: sort them once, then take the few ≤ score.
        mine = self._zs.get(key)
        if mine is None:
            mine = self._zs[key] = sorted(set(self._z[key]))
        at = bisect_right(mine, score, key=_score)
        if not at:
            return found
        top = mine[max(at - FLOOR_LIMIT, 0):at]
        if not found:
            return top[::-1]
        return sorted({*found, *top}, reverse=True)[:FLOOR_LIMIT]

    def write(self, op: Op) -> None:
        self.ops.append(op)
        key = op.key
        if isinstance(op, ZAdd):
            self._z.setdefault(key, []).append((op.score, op.member))
            self._zs.pop(key, None)
            return
        if key in self._h or key in self._s:
            self._merge(op)
        else:
            self._pending.setdefault(key, []).append(op)

    # typed writers (the engine's vocabulary); each records one merge op. The three the engine
    # calls per request (hsetnx, sadd, zadd) inline `write` + `_merge` for their own op type.
    def hsetnx(self, key: str, field: str, value: str) -> None:
        op = HSetNX(key, field, value)
        self.ops.append(op)
        if key in self._h or key in self._s:
            current = self._own_hash(key)
            if field not in current:
                current[field] = value
        else:
            self._pending.setdefault(key, []).append(op)

    def hmax(self, key: str, field: str, value: str) -> None:
        self.write(HMax(key, field, value))

    def sadd(self, key: str, members: tuple[str, ...]) -> None:
        op = SAdd(key, members)
        self.ops.append(op)
        if key in self._h or key in self._s:
            self._own_set(key).update(members)
        else:
            self._pending.setdefault(key, []).append(op)

    def srem(self, key: str, members: tuple[str, ...]) -> None:
        self.write(SRem(key, members))

    def zadd(self, key: str, score: int, member: str) -> None:
        self.ops.append(ZAdd(key, score, member))
        self._z.setdefault(key, []).append((score, member))
        if self._zs:
            self._zs.pop(key, None)

    def delete(self, key: str) -> None:
        self.write(Delete(key))

    def _own_hash(self, key: str) -> dict[str, str]:
        if key not in self._owned:
            self._h[key] = dict(self._h.get(key) or {})
            self._owned.add(key)
        return self._h[key]

    def _own_set(self, key: str) -> set[str]:
        if key not in self._owned:
            self._s[key] = set(self._s.get(key) or ())
            self._owned.add(key)
        return self._s[key]

    def _merge(self, op: Op) -> None:
        if isinstance(op, SAdd):
            self._own_set(op.key).update(op.members)
        elif isinstance(op, SRem):
            self._own_set(op.key).difference_update(op.members)
        elif isinstance(op, Delete):
            self._h[op.key] = {}
            self._s[op.key] = set()
            self._owned.add(op.key)
        elif isinstance(op, ZAdd):
            pass
        else:
            current = self._own_hash(op.key)
            old = current.get(op.field)
            if old is None or (isinstance(op, HMin) and op.value < old) or (
                    isinstance(op, HMax) and op.value > old):
                current[op.field] = op.value
            assert isinstance(op, HMin | HMax | HSetNX)

    def commit(self) -> None:
        if self.ops:
            self.store.apply(self.ops)
        self.ops = []
        self._h.clear()
        self._s.clear()
        self._owned.clear()
        self._pending.clear()
        self._f.clear()
        self._z.clear()
        self._zs.clear()


class DirectTxn(Txn):
    """The same interface over a DirectStateStore: reads and writes go straight to the store
    (loads are no-ops, nothing is batched, no op objects are made). The typed readers and
    writers are the store's own bound methods, set per instance: the engine calls them a few
    million times in a rebuild, and a forwarding method would double that call cost."""

    __slots__ = ("_d", "delete", "floor", "hash", "hmax", "hsetnx", "members", "sadd", "srem", "zadd")
    batched = False

    def __init__(self, store: DirectStateStore) -> None:
        super().__init__(store)
        self._d = store
        self.hash = store.hget  # type: ignore[method-assign]
        self.members = store.smembers  # type: ignore[method-assign]
        self.floor = store.zfloor  # type: ignore[method-assign]
        self.hsetnx = store.hsetnx  # type: ignore[method-assign]
        self.hmax = store.hmax  # type: ignore[method-assign]
        self.sadd = store.sadd  # type: ignore[method-assign]
        self.srem = store.srem  # type: ignore[method-assign]
        self.zadd = store.zadd  # type: ignore[method-assign]
        self.delete = store.delete  # type: ignore[method-assign]

    def load(self, hashes: Iterable[str] = (), sets: Iterable[str] = (),
             floors: Iterable[Floor] = ()) -> None:
        return

    def write(self, op: Op) -> None:
        self._d.apply((op,))

    def commit(self) -> None:
        return


def open_txn(store: StateStore) -> Txn:
    return DirectTxn(store) if isinstance(store, DirectStateStore) else Txn(store)
