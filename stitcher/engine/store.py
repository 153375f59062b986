"""The state-store interface between the join engine and its backends (memory, Redis).

Contract (every backend; tests/contract/store_contract.py checks it):

* State is a set of keys; each key holds a hash (str field → str value), a set of str
  members, or a sorted set (str members with int scores < 2**53). A key that was never
  written (or expired) reads as empty.
* `load(hashes, sets, floors)` returns a `Snapshot` of the named keys in one round trip; a
  floor query (key, score) returns the FLOOR_LIMIT members with the highest scores ≤ score,
  highest first (Redis: ZREVRANGEBYSCORE key score -inf LIMIT 0 FLOOR_LIMIT; equal scores in
  reverse member order, as Redis gives them). The caller
  treats the returned containers as read-only and drops them before its next `apply` (so the
  memory backend may hand out its own dicts without copying; the engine copies on write).
* `apply(ops)` applies a batch of `Op`s atomically enough that a reader never sees half of a
  batch applied to one key (Redis: one pipeline / one Lua call per batch). Ops are a small
  closed set of *merges*: applying the same batch twice, or two batches in either order, gives
  the same state, except `SRem`/`Delete`, which the engine only uses for state it has finished
  with (and which redelivery re-creates identically).
* Values compare as strings (Lua `<` / Python `<`): the engine encodes numbers fixed-width, so
  string order is numeric order, and "min by (ts, id)" is a min over "ts|id" strings.
* Keys carry a Redis Cluster hash tag (`{...}`): keys that one decision reads together share it.
* Every written key gets the backend's TTL (Redis: EXPIRE on each write; memory: no expiry,
  as an offline rebuild is finite).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HMin:
    """hash[key][field] = min(current, value); set it when absent."""

    key: str
    field: str
    value: str


@dataclass(frozen=True, slots=True)
class HMax:
    """hash[key][field] = max(current, value); set it when absent."""

    key: str
    field: str
    value: str


@dataclass(frozen=True, slots=True)
class HSetNX:
    """hash[key][field] = value unless the field exists (first writer wins).

    The engine only writes deterministic values with it (the same field always gets the same
    value), so it is order-independent in practice and works as a claim."""

    key: str
    field: str
    value: str


@dataclass(frozen=True, slots=True)
class SAdd:
    """set[key] ∪= members."""

    key: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ZAdd:
    """zset[key] ∪= {member} with `score` (an int < 2**53). The engine always gives a member
    the same score (the score is derived from the member), so re-adding is a no-op."""

    key: str
    score: int
    member: str


@dataclass(frozen=True, slots=True)
class SRem:
    """set[key] -= members (finished work only)."""

    key: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """Drop a key (finished work only)."""

    key: str


Op = HMin | HMax | HSetNX | SAdd | ZAdd | SRem | Delete
OP_TYPES: tuple[type, ...] = (HMin, HMax, HSetNX, SAdd, ZAdd, SRem, Delete)
FLOOR_LIMIT = 8
Floor = tuple[str, int]


@dataclass(slots=True)
class Snapshot:
    """The loaded state: every requested key is present (empty when absent in the store)."""

    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    sets: dict[str, set[str]] = field(default_factory=dict)
    floors: dict[Floor, list[tuple[int, str]]] = field(default_factory=dict)  # (score, member)


class StateStore(ABC):
    """Where the engine keeps join state between frames. Implementations must not interpret
    keys or values beyond the op semantics above (the Redis store groups keys by hash tag for
    Cluster slots and for its node mirror; neither changes what a load returns)."""

    # True when every `load` returns hashes and sets made for that call alone (a network store
    # parses fresh ones): the caller may then write into them instead of copying them first.
    fresh_loads = False

    @abstractmethod
    def load(self, hashes: Sequence[str] = (), sets: Sequence[str] = (),
             floors: Sequence[Floor] = ()) -> Snapshot:
        """Read the named hash keys, set keys and sorted-set floors in one round trip. The
        returned containers are read-only for the caller and valid until its next `apply`."""

    @abstractmethod
    def apply(self, ops: Sequence[Op]) -> None:
        """Apply one batch of merge ops; raise on failure (the caller must not ack the frame)."""

    def local_floor(self, key: str, score: int) -> list[tuple[int, str]] | None:
        """A floor query's answer if the store has it at hand without a round trip (as a
        `load` would return it now), else None; default: never."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; default: nothing to release."""


class DirectStateStore(StateStore):
    """A store in the engine's own process that applies each op at once (the memory store).
    The engine then reads and writes it directly through the typed methods below instead of
    batching op objects per frame — same results, much less work. A frame is then not applied
    atomically, which matters only for a crash mid-frame: an offline rebuild starts over."""

    @abstractmethod
    def hget(self, key: str) -> Mapping[str, str]:
        """The hash (read-only view; empty when absent)."""

    @abstractmethod
    def smembers(self, key: str) -> Set[str]:
        """The set (read-only view; empty when absent)."""

    @abstractmethod
    def zfloor(self, key: str, score: int) -> list[tuple[int, str]]:
        """As a `load` floor query."""

    @abstractmethod
    def hsetnx(self, key: str, field: str, value: str) -> None: ...

    @abstractmethod
    def hmin(self, key: str, field: str, value: str) -> None: ...

    @abstractmethod
    def hmax(self, key: str, field: str, value: str) -> None: ...

    @abstractmethod
    def sadd(self, key: str, members: tuple[str, ...]) -> None: ...

    @abstractmethod
    def srem(self, key: str, members: tuple[str, ...]) -> None: ...

    @abstractmethod
    def zadd(self, key: str, score: int, member: str) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def load(self, hashes: Sequence[str] = (), sets: Sequence[str] = (),
             floors: Sequence[Floor] = ()) -> Snapshot:
        return Snapshot(hashes={k: dict(self.hget(k)) for k in hashes},
                        sets={k: set(self.smembers(k)) for k in sets},
                        floors={f: self.zfloor(*f) for f in floors})

    def apply(self, ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, HSetNX):
                self.hsetnx(op.key, op.field, op.value)
            elif isinstance(op, HMin):
                self.hmin(op.key, op.field, op.value)
            elif isinstance(op, HMax):
                self.hmax(op.key, op.field, op.value)
            elif isinstance(op, SAdd):
                self.sadd(op.key, op.members)
            elif isinstance(op, SRem):
                self.srem(op.key, op.members)
            elif isinstance(op, ZAdd):
                self.zadd(op.key, op.score, op.member)
            elif isinstance(op, Delete):
                self.delete(op.key)
            else:
                raise TypeError(f"unknown store op {op!r}")


def merge_hash(current: dict[str, str], op: HMin | HMax | HSetNX) -> None:
    """Apply one hash op to a Python dict: the reference semantics every backend mirrors."""
    old = current.get(op.field)
    if old is None:
        current[op.field] = op.value
    elif isinstance(op, HMin):
        if op.value < old:
            current[op.field] = op.value
    elif isinstance(op, HMax) and op.value > old:
        current[op.field] = op.value


def keys_of(ops: Iterable[Op]) -> Mapping[str, None]:
    """The keys a batch touches, in first-seen order (for TTL refresh and slot grouping)."""
    return dict.fromkeys(op.key for op in ops)
