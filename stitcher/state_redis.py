"""RedisStateStore: the engine's StateStore in Redis, shared by every stitcher worker.

One `apply(ops)` is one Lua call (EVALSHA, loaded again on NOSCRIPT) that runs the whole batch
of merge ops atomically and sets the TTL (`RedisSettings.key_ttl_s`) on every key it wrote.
On Redis Cluster (`cluster=True`) a script may only touch keys of one hash slot, so the batch is
split by slot (the engine's `{tag}` keys keep each decision inside one slot) and the per-slot
calls go out in one pipeline per primary; there `load()` is one pipeline of HGETALL/SMEMBERS/
ZREVRANGEBYSCORE (tests/integration/test_stitch_redis_cluster.py runs the engine on a real
three-primary cluster).

Values are compared bytewise in Lua (not with `<`, which uses the server's collation locale)
so Redis orders them exactly as Python orders str, as the contract requires.

`namespace` is put in front of every key (outside the hash tag, so slots do not change): a
replay or a test can stitch into the same Redis without meeting the live state.

Node-local sorted sets (keys tagged `{p:<node>|<pid>}`: a node's thread lineage and the
requests each of its threads served) are read again and again — a pool thread's lane at every
call it makes — so a worker keeps a mirror of those it reads (`_NodeMirror`) and answers floor
queries from it. Redis stays the only source of truth (every write still goes there), and the
mirror answers only what it provably holds: each `apply` that touches a node's keys stamps that
node in `w:{g}:nodever` with a value unique to that write (and reads the stamp it replaces) in
the same Lua call, and a worker trusts its copy of a node only while the stamp is still the one
its own last write put there — another worker's write, a flush or an expiry makes it read Redis
again (unique stamps, not counters: a counter reset by a flush could count back to a value seen
before). While the frame lease is held no other worker writes, so the stamps are checked once
per lease acquisition (without a lease, at every load). Not on Cluster (the stamps would live in
another slot than the keys).

`FrameLease` serialises whole engine frames across workers. The engine's merges are safe in any
order, but a frame also *reads* shared state (the watermarks, the due schedule, a parent's
trace, the emitted flag) and then writes based on it; two workers doing that at once could both
emit a span, or each miss the child the other just parked. The lease is a Redis key with an
expiry; while it is held, every `apply` checks in the same Lua call that the lease is still this
worker's (fencing), so a worker that stalled past the expiry cannot write with stale reads.
On Cluster the lease key lives in its own slot, so no script can check it with the writes:
there `apply` reads the lease just before sending them, which catches a worker that stalled
while it computed the batch, but not one that stalls in the milliseconds between that read and
its writes.
"""

from __future__ import annotations

import binascii
import bisect
import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis
from redis.exceptions import AskError, ClusterDownError, NoScriptError, TryAgainError

from stitcher.engine.store import (
    FLOOR_LIMIT,
    Delete,
    Floor,
    HMax,
    HMin,
    HSetNX,
    Op,
    SAdd,
    Snapshot,
    SRem,
    StateStore,
    ZAdd,
    keys_of,
)
from weft.config import RedisSettings

logger = logging.getLogger(__name__)

# ARGV[1] = ttl; ARGV[2] = lease token ('' = unfenced; else KEYS[1] is the lease key and must
# still hold it); ARGV[3] = a JSON array of op records, flattened (one string to pack and parse
# instead of hundreds of arguments): code, key index, then code-specific arguments, all strings
# but the key index (Lua numbers would round scores above 2**47).
#   m/M/n key field value   (HMin / HMax / HSetNX)
#   s/r   key count members (SAdd / SRem)
#   z     key score member    (ZAdd)
#   d     key               (Delete)
_APPLY_LUA = r"""
local function lt(a, b)
  local n = math.min(#a, #b)
  for j = 1, n do
    local x, y = string.byte(a, j), string.byte(b, j)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local ttl = tonumber(ARGV[1])
if ARGV[2] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return redis.error_reply('WEFTLEASE the frame lease was lost; reload and redo the frame')
end
local A = cjson.decode(ARGV[3])
local touched = {}
local i = 1
local argc = #A
while i <= argc do
  local code = A[i]
  local key = KEYS[A[i + 1]]
  if code == 'm' or code == 'M' then
    local f, v = A[i + 2], A[i + 3]
    local old = redis.call('HGET', key, f)
    if (not old) or (code == 'm' and lt(v, old)) or (code == 'M' and lt(old, v)) then
      redis.call('HSET', key, f, v)
    end
    touched[key] = true
    i = i + 4
  elseif code == 'n' then
    redis.call('HSETNX', key, A[i + 2], A[i + 3])
    touched[key] = true
    i = i + 4
  elseif code == 's' or code == 'r' then
    local n = tonumber(A[i + 2])
    local cmd = (code == 's') and 'SADD' or 'SREM'
    local first = i + 3
    while first <= i + 2 + n do
      local last = math.min(first + 999, i + 2 + n)
      redis.call(cmd, key, unpack(A, first, last))
      first = last + 1
    end
    if code == 's' and n > 0 then touched[key] = true end
    i = i + 3 + n
  elseif code == 'z' then
    redis.call('ZADD', key, A[i + 2], A[i + 3])
    touched[key] = true
    i = i + 4
  elseif code == 'd' then
    redis.call('DEL', key)
    touched[key] = nil
    i = i + 2
  else
    return redis.error_reply('weft store: unknown op code ' .. tostring(code))
  end
end
for key in pairs(touched) do
  redis.call('EXPIRE', key, ttl)
end
if ARGV[4] ~= nil and ARGV[4] ~= '' then
  -- node groups written by this batch: stamp them, return the stamps replaced (see _NodeMirror)
  local vkey = KEYS[tonumber(ARGV[4])]
  local groups = cjson.decode(ARGV[5])
  local out = {}
  for j = 1, #groups do
    out[j] = redis.call('HGET', vkey, groups[j])
    redis.call('HSET', vkey, groups[j], ARGV[6])
  end
  redis.call('EXPIRE', vkey, ttl)
  return out
end
return 1
"""


def hash_slot(key: str) -> int:
    """Redis Cluster slot of a key: CRC16 (XMODEM) of its `{tag}` if it has a non-empty one."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key.encode(), 0) % 16384


_OP_TYPES = (HMin, HMax, HSetNX, SAdd, ZAdd, SRem, Delete)
NODE_VERSIONS = "w:{g}:nodever"   # hash: node → stamp of the last batch that wrote its keys


# One round trip for a whole `load`: KEYS = hashes, then sets, then floor keys; ARGV[1] = number
# of hashes, ARGV[2] = number of sets, ARGV[3] = floor limit, ARGV[4..] = the floors' scores.
_LOAD_LUA = """
local nh, ns, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  if i <= nh then
    out[i] = redis.call('HGETALL', KEYS[i])
  elseif i <= nh + ns then
    out[i] = redis.call('SMEMBERS', KEYS[i])
  else
    out[i] = redis.call('ZREVRANGEBYSCORE', KEYS[i], ARGV[i - nh - ns + 3], '-inf',
                        'WITHSCORES', 'LIMIT', 0, limit)
  end
end
return out
"""

# `load` with the node mirror on: KEYS = hashes, sets, plain floors, tail floors, then the
# version hash when groups are read. ARGV[1..7] = counts (hashes, sets, floor limit, plain
# floors, tail floors, largest tail, groups), then the plain floors' scores, the tail floors'
# scores, the group names. A tail floor returns {above, pttl, entries}: every entry above the
# score plus the floor itself, highest first ({-1, -1, floor} when more than `largest tail` lie
# above: then it is only a floor). The last reply is HMGET of the groups' stamps.
_MIRROR_LOAD_LUA = """
local nh, ns, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local np, nt, tmax, ng = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {}
for i = 1, nh + ns + np + nt do
  local k = KEYS[i]
  if i <= nh then
    out[i] = redis.call('HGETALL', k)
  elseif i <= nh + ns then
    out[i] = redis.call('SMEMBERS', k)
  else
    local s = ARGV[7 + i - nh - ns]
    if i <= nh + ns + np then
      out[i] = redis.call('ZREVRANGEBYSCORE', k, s, '-inf', 'WITHSCORES', 'LIMIT', 0, limit)
    else
      local above = redis.call('ZCOUNT', k, '(' .. s, '+inf')
      if above > tmax then
        out[i] = {-1, -1, redis.call('ZREVRANGEBYSCORE', k, s, '-inf', 'WITHSCORES', 'LIMIT', 0, limit)}
      else
        out[i] = {above, redis.call('PTTL', k),
                  redis.call('ZREVRANGEBYSCORE', k, '+inf', '-inf', 'WITHSCORES', 'LIMIT', 0, above + limit)}
      end
    end
  end
end
if ng > 0 then
  local groups = {}
  for j = 1, ng do groups[j] = ARGV[7 + np + nt + j] end
  out[nh + ns + np + nt + 1] = redis.call('HMGET', KEYS[nh + ns + np + nt + 1], unpack(groups))
end
return out
"""

# KEYS[1] lease, KEYS[2] "someone waits" marker; ARGV token, ttl ms. A free lease is left to a
# different worker that is already waiting for it, so two busy workers take turns.
_ACQUIRE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', 100)
  return 0
end
local waiting = redis.call('GET', KEYS[2])
if waiting and waiting ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if waiting then redis.call('DEL', KEYS[2]) end
return 1
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLostError(RuntimeError):
    """This worker's frame lease expired while it worked; the frame must be done again."""


def _encode(ops: Sequence[Op], ttl_s: int, ns: str = "", fence: tuple[str, str] | None = None,
            versions: tuple[str, Sequence[str], str] | None = None) -> tuple[list[str], list[str]]:
    """KEYS and ARGV for one script call running `ops` in order (and stamping the groups of
    `versions` = (stamp hash key, groups, stamp))."""
    index: dict[str, int] = {}
    token = ""
    if fence is not None:
        index[fence[0]] = 1
        token = fence[1]
    version_args = ["", "", ""]
    if versions is not None and versions[1]:
        index[versions[0]] = len(index) + 1
        version_args = [str(index[versions[0]]), json.dumps(list(versions[1]), ensure_ascii=False),
                        versions[2]]
    records: list[str | int] = []
    add = records.extend
    for op in ops:  # a few hundred ops per frame: exact type tests and casts, no isinstance
        t = type(op)
        k = index.setdefault(ns + op.key, len(index) + 1)
        if t is HSetNX or t is HMin or t is HMax:
            h = cast(HSetNX, op)
            add(("n" if t is HSetNX else "m" if t is HMin else "M", k, h.field, h.value))
        elif t is SAdd or t is SRem:
            members = cast(SAdd, op).members
            add(("s" if t is SAdd else "r", k, len(members), *members))
        elif t is ZAdd:
            z = cast(ZAdd, op)
            add(("z", k, str(z.score), z.member))
        else:
            add(("d", k))
    return list(index), [str(ttl_s), token, json.dumps(records, ensure_ascii=False, separators=(",", ":")),
                         *version_args]


def _pairs(reply: Any) -> dict[str, str]:
    """A hash reply: a dict already (pipelined), or a flat [field, value, ...] list (script)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _scored(reply: Any) -> list[tuple[int, str]]:
    """A floor reply: [(member, score)] (pipelined) or flat [member, score, ...] (script)."""
    if reply and isinstance(reply[0], list | tuple):
        return [(int(score), member) for member, score in reply]
    # built in C (map/zip): a decision batch parses tens of thousands of these
    return list(zip(map(int, reply[1::2]), reply[::2], strict=True))


_TOP = "\U0010ffff"           # sorts after every member: (score, _TOP) ends a score's run
# Entries above a floor worth copying to start a key's mirror: a worker catching up ingests
# far ahead of the floors it decides by, and copying a long tail per read would cost more
# than the plain floor it replaces (then it stays a plain floor).
MIRROR_TAIL_MAX = 48
MIRROR_KEEP = 1024            # newest entries kept per mirrored key (older floors read Redis)
MIRROR_MAX_KEYS = 100_000     # then the whole mirror is dropped (it is only a cache)


def node_group(key: str) -> str | None:
    """The node whose mirror may hold `key` ("w:{p:<node>|<pid>}..." → node), else None."""
    if not key.startswith("w:{p:"):
        return None
    end = key.find("}", 5)
    if end < 0:
        return None
    node, bar, _ = key[5:end].rpartition("|")
    return node if bar else None


class _Mirrored:
    """One mirrored sorted set: `entries` ascending by (score, member) hold every entry Redis
    has with score >= `lo` (all of them when `lo` is None); trusted until `deadline` (monotonic
    seconds), well inside the TTL Redis gave the key at its last write we know of."""

    __slots__ = ("deadline", "entries", "lo")

    def __init__(self, entries: list[tuple[int, str]], lo: int | None, deadline: float) -> None:
        self.entries = entries
        self.lo = lo
        self.deadline = deadline


class _NodeMirror:
    """Worker-local copies of node-local sorted sets, grouped by node, each group valid only
    while the node's stamp in Redis is the one last seen here (see the module docstring).
    Only the nodes this worker wrote last (`mine`: the ones whose frames it ingests) are
    copied; another worker's nodes keep changing under it, so their floors stay plain reads."""

    def __init__(self, ttl_s: int) -> None:
        self.keep_s = ttl_s / 2
        self.keys: dict[str, _Mirrored] = {}
        self.by_group: dict[str, set[str]] = {}
        self.known: dict[str, str | None] = {}  # node → the stamp this mirror is valid for
        self.mine: set[str] = set()            # nodes whose stamp our own write set last

    def floor(self, key: str, score: int, now: float) -> list[tuple[int, str]] | None:
        """The floor query's answer if the mirror provably holds it, else None."""
        m = self.keys.get(key)
        if m is None:
            return None
        if now >= m.deadline:
            self._forget(key)
            return None
        entries = m.entries
        end = bisect.bisect_right(entries, (score, _TOP))
        if m.lo is not None and end - bisect.bisect_left(entries, (m.lo, "")) < FLOOR_LIMIT:
            return None
        return entries[max(0, end - FLOOR_LIMIT):end][::-1]

    def install(self, key: str, group: str, above: int, pttl_ms: int,
                highest_first: list[tuple[int, str]], now: float) -> None:
        """A tail read: every entry above the floor's score, then the floor (highest first)."""
        if len(self.keys) >= MIRROR_MAX_KEYS:
            self.clear()
        complete = len(highest_first) < above + FLOOR_LIMIT
        # a tie at the last entry may continue past the LIMIT: trust only scores above it
        lo = None if complete else highest_first[-1][0] + 1
        life = self.keep_s if pttl_ms < 0 else min(self.keep_s, pttl_ms / 2000)
        self.keys[key] = _Mirrored(highest_first[::-1], lo, now + life)
        self.by_group.setdefault(group, set()).add(key)
        self._trim(key)

    def wrote(self, ops: Iterable[Op], now: float) -> None:
        """Ops that Redis applied: the mirrored keys among them get the same changes."""
        keys = self.keys
        for op in ops:
            m = keys.get(op.key)
            if m is None:
                continue
            if now >= m.deadline:     # Redis may have expired it before this write recreated it
                self._forget(op.key)
                continue
            if type(op) is ZAdd:
                entry = (op.score, op.member)
                entries = m.entries
                if not entries or entry > entries[-1]:
                    entries.append(entry)
                else:
                    i = bisect.bisect_left(entries, entry)
                    if i == len(entries) or entries[i] != entry:
                        entries.insert(i, entry)
                m.deadline = now + self.keep_s
                if len(entries) > 2 * MIRROR_KEEP:
                    self._trim(op.key)
            elif type(op) is Delete:
                m.entries, m.lo, m.deadline = [], None, now + self.keep_s
            else:  # not a sorted-set op: the key is not what the mirror thought
                self._forget(op.key)

    def seen(self, group: str, value: str | None) -> None:
        """Redis says the group's stamp is `value` (a read)."""
        if self.known.get(group) != value:
            self.drop(group)
            self.mine.discard(group)
            self.known[group] = value

    def stamped(self, group: str, replaced: str | None, stamp: str) -> None:
        """Our own write stamped the group, replacing `replaced`: the copies stay good if that
        was the stamp they were good for (nobody else wrote in between)."""
        if self.known.get(group) != replaced:
            self.drop(group)     # someone else wrote in between: copies from before are stale
        self.known[group] = stamp
        self.mine.add(group)

    def drop(self, group: str) -> None:
        for key in self.by_group.pop(group, ()):
            self.keys.pop(key, None)

    def clear(self) -> None:
        self.keys.clear()
        self.by_group.clear()

    def _forget(self, key: str) -> None:
        self.keys.pop(key, None)
        group = node_group(key)
        if group is not None:
            self.by_group.get(group, set()).discard(key)

    def _trim(self, key: str) -> None:
        m = self.keys[key]
        if len(m.entries) > MIRROR_KEEP:
            del m.entries[:-MIRROR_KEEP]
            # entries tied with the oldest kept one may be gone: trust only scores above it
            m.lo = max(m.lo or 0, m.entries[0][0] + 1)


class RedisStateStore(StateStore):
    """StateStore on Redis (standalone, or Cluster with `cluster=True`)."""

    fresh_loads = True    # every reply is parsed into new dicts and sets

    def __init__(self, settings: RedisSettings, *, cluster: bool = False, namespace: str = "",
                 client: Any | None = None, timeout_s: float = 10.0, mirror: bool = True) -> None:
        """`mirror`: keep the node mirror (module docstring); never on Cluster."""
        self.settings = settings
        self.cluster = cluster
        self.namespace = namespace
        self._mirror = _NodeMirror(settings.key_ttl_s) if mirror and not cluster else None
        self._verified = False     # the mirror's stamps were checked under the current fence
        self._stamp_prefix = uuid.uuid4().hex[:16]
        self._stamps = 0
        self.fence = None          # (lease key, token) while a FrameLease is held
        # A hung server must surface as an error (then retry / exit), never as a silent hang.
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        if client is not None:
            self._redis = client
        elif cluster:
            from redis.cluster import RedisCluster
            self._redis = RedisCluster.from_url(settings.url, decode_responses=True,
                                                **settings.client_kwargs(), **timeouts)
        else:
            self._redis = redis.Redis.from_url(settings.url, decode_responses=True,
                                               **settings.client_kwargs(), **timeouts)
        self._sha = self._redis.script_load(_APPLY_LUA)
        self._load_sha = self._redis.script_load(_LOAD_LUA)
        self._mirror_sha = self._redis.script_load(_MIRROR_LOAD_LUA) if self._mirror else ""
        self.batches = 0
        self.mirror_hits = 0       # floor queries the mirror answered

    @property
    def client(self) -> Any:
        return self._redis

    @property
    def fence(self) -> tuple[str, str] | None:
        return self._fence

    @fence.setter
    def fence(self, value: tuple[str, str] | None) -> None:
        # a new holding of the lease (or none): other workers may have written since
        self._fence = value
        self._verified = False

    def load(self, hashes: Sequence[str] = (), sets: Sequence[str] = (),
             floors: Sequence[Floor] = ()) -> Snapshot:
        if not hashes and not sets and not floors:
            return Snapshot()
        if self._mirror is not None:
            return self._load_mirrored(hashes, sets, floors, self._mirror)
        ns = self.namespace
        if self.cluster:  # keys of many slots: one pipeline of plain reads
            replies = self._load_pipelined(hashes, sets, floors)
        else:  # one script call: one command to pack and one reply to parse instead of hundreds
            keys = [ns + k for k in hashes] + [ns + k for k in sets] + [ns + k for k, _ in floors]
            args = [len(hashes), len(sets), FLOOR_LIMIT, *(score for _, score in floors)]
            try:
                replies = self._redis.evalsha(self._load_sha, len(keys), *keys, *args)
            except NoScriptError:
                self._load_sha = self._redis.script_load(_LOAD_LUA)
                replies = self._redis.evalsha(self._load_sha, len(keys), *keys, *args)
        n, m = len(hashes), len(hashes) + len(sets)
        return Snapshot(hashes={k: _pairs(v) for k, v in zip(hashes, replies[:n], strict=True)},
                        sets={k: set(v) for k, v in zip(sets, replies[n:m], strict=True)},
                        floors={f: _scored(v) for f, v in zip(floors, replies[m:], strict=True)})

    def local_floor(self, key: str, score: int) -> list[tuple[int, str]] | None:
        # only under a lease whose holding was checked: then no other worker writes meanwhile
        if self._mirror is None or self._fence is None or not self._verified:
            return None
        answer = self._mirror.floor(key, score, time.monotonic())
        if answer is not None:
            self.mirror_hits += 1
        return answer

    def _load_mirrored(self, hashes: Sequence[str], sets: Sequence[str], floors: Sequence[Floor],
                       mirror: _NodeMirror) -> Snapshot:
        """`load` with node-local floors answered by the mirror where it provably can, the
        others read with their tails (to start mirroring them), the stamps checked."""
        now = time.monotonic()
        served: dict[Floor, list[tuple[int, str]]] = {}
        served_group: dict[Floor, str] = {}
        plain: list[Floor] = []
        tails: list[tuple[Floor, str]] = []
        for f in floors:
            group = node_group(f[0])
            if group is None or group not in mirror.mine:
                plain.append(f)
                continue
            answer = mirror.floor(f[0], f[1], now)
            if answer is None:
                tails.append((f, group))
            else:
                served[f] = answer
                served_group[f] = group
        verify = self._fence is None or not self._verified
        # only the nodes copies are kept for need checking (a few per worker, not every node)
        groups = set(mirror.mine) if verify else set()
        groups.update(g for _, g in tails if g not in mirror.known)
        if not hashes and not sets and not plain and not tails and not groups:
            self.mirror_hits += len(served)
            return Snapshot(floors=served)
        ns = self.namespace
        names = sorted(groups)
        keys = [ns + k for k in hashes] + [ns + k for k in sets] + [ns + k for k, _ in plain] + \
            [ns + f[0] for f, _ in tails] + ([ns + NODE_VERSIONS] if names else [])
        args = [len(hashes), len(sets), FLOOR_LIMIT, len(plain), len(tails), MIRROR_TAIL_MAX, len(names),
                *(score for _, score in plain), *(f[1] for f, _ in tails), *names]
        try:
            replies = self._redis.evalsha(self._mirror_sha, len(keys), *keys, *args)
        except NoScriptError:
            self._mirror_sha = self._redis.script_load(_MIRROR_LOAD_LUA)
            replies = self._redis.evalsha(self._mirror_sha, len(keys), *keys, *args)
        n, m, p = len(hashes), len(hashes) + len(sets), len(hashes) + len(sets) + len(plain)
        out = Snapshot(hashes={k: _pairs(v) for k, v in zip(hashes, replies[:n], strict=True)},
                       sets={k: set(v) for k, v in zip(sets, replies[n:m], strict=True)},
                       floors={f: _scored(v) for f, v in zip(plain, replies[m:p], strict=True)})
        dropped: set[str] = set()
        if names:
            for group, value in zip(names, replies[p + len(tails)], strict=True):
                if mirror.known.get(group) != value:
                    dropped.add(group)
                mirror.seen(group, value)
        if verify:
            self._verified = True
        for (f, group), (above, pttl, flat) in zip(tails, replies[p:p + len(tails)], strict=True):
            entries = _scored(flat)
            if above < 0:      # too much above the floor to copy: a plain floor
                out.floors[f] = entries
                continue
            out.floors[f] = entries[above:above + FLOOR_LIMIT]
            if group in mirror.mine:   # else another worker wrote it meanwhile: no copy
                mirror.install(f[0], group, above, pttl, entries, now)
        stale = [f for f, group in served_group.items() if group in dropped]
        for f in stale:
            del served[f]
        self.mirror_hits += len(served)
        out.floors.update(served)
        if stale:     # another worker wrote those nodes since: read them again
            out.floors.update(self._load_mirrored((), (), stale, mirror).floors)
        return out

    def _load_pipelined(self, hashes: Sequence[str], sets: Sequence[str],
                        floors: Sequence[Floor]) -> list[Any]:
        ns = self.namespace
        pipe = self._redis.pipeline(transaction=False)
        for key in hashes:
            pipe.hgetall(ns + key)
        for key in sets:
            pipe.smembers(ns + key)
        for key, score in floors:
            pipe.zrevrangebyscore(ns + key, score, "-inf", start=0, num=FLOOR_LIMIT, withscores=True)
        replies: list[Any] = pipe.execute()
        return replies

    def _calls(self, ops: Sequence[Op], groups: Sequence[str] = (),
               stamp: str = "") -> list[tuple[list[str], list[str]]]:
        if not self.cluster:
            return [_encode(ops, self.settings.key_ttl_s, self.namespace, self.fence,
                            (self.namespace + NODE_VERSIONS, groups, stamp))]
        by_slot: dict[int, list[Op]] = {}
        for op in ops:  # ops on one key stay in order; different slots are independent keys
            by_slot.setdefault(hash_slot(op.key), []).append(op)
        return [_encode(group, self.settings.key_ttl_s, self.namespace) for group in by_slot.values()]

    def apply(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        for op in ops:
            if type(op) not in _OP_TYPES:
                raise TypeError(f"unknown store op {op!r}")
        mirror = self._mirror
        groups: list[str] = []
        if mirror is not None:
            groups = sorted({g for g in map(node_group, keys_of(ops)) if g is not None})
        stamp = ""
        if groups:
            self._stamps += 1
            stamp = f"{self._stamp_prefix}:{self._stamps}"
        calls = self._calls(ops, groups, stamp)
        if self.cluster and self._fence is not None:
            lease_key, token = self._fence
            if self._redis.get(lease_key) != token:
                raise LeaseLostError("WEFTLEASE the frame lease was lost; reload and redo the frame")
        try:
            try:
                replies = self._run(calls)
            except redis.ResponseError as exc:
                if not isinstance(exc, NoScriptError):
                    if "WEFTLEASE" in str(exc):
                        raise LeaseLostError(str(exc)) from None
                    raise
                # Redis restarted or SCRIPT FLUSH: load again and re-run; every op is idempotent.
                logger.info("Lua merge script missing on the server; loading it again")
                self._sha = self._redis.script_load(_APPLY_LUA)
                replies = self._run(calls)
        except Exception:
            self._verified = False    # whether it was applied is unknown: check the stamps
            raise
        if mirror is not None and groups:
            mirror.wrote(ops, time.monotonic())
            for group, replaced in zip(groups, replies[0], strict=True):
                mirror.stamped(group, replaced, stamp)
        self.batches += 1

    def _run(self, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        if self.cluster:
            return self._run_on_primaries(calls)
        if len(calls) == 1:
            keys, argv = calls[0]
            return [self._redis.evalsha(self._sha, len(keys), *keys, *argv)]
        pipe = self._redis.pipeline(transaction=False)
        for keys, argv in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *argv)
        replies: list[Any] = pipe.execute()
        return replies

    def _run_on_primaries(self, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        """Cluster: one script call per slot (see `_calls`), pipelined to the primary that owns
        it. redis-py's cluster pipeline refuses EVALSHA, and one call at a time would cost a
        round trip per slot (a batch touches thousands). A slot that moved (MOVED/ASK while
        the cluster reshards) fails the batch: the slot map is read again and the caller
        retries the whole batch, which is safe because every op is a merge."""
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, (keys, _) in enumerate(calls):
            node = self._redis.get_node_from_key(keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)
        for node, indexes in by_node.values():
            pipe = node.redis_connection.pipeline(transaction=False)
            for i in indexes:
                keys, argv = calls[i]
                pipe.evalsha(self._sha, len(keys), *keys, *argv)
            try:
                answers = pipe.execute()
            except (AskError, TryAgainError, ClusterDownError):   # AskError includes MovedError
                self._redis.nodes_manager.initialize()
                raise
            for i, answer in zip(indexes, answers, strict=True):
                replies[i] = answer
        return replies

    def lease(self, name: str = "frames", *, ttl_ms: int = 10_000) -> FrameLease:
        return FrameLease(self, name, ttl_ms=ttl_ms)

    def close(self) -> None:
        self._redis.close()


class FrameLease:
    """A Redis lease that lets one worker at a time run an engine frame (see module docstring).

    `try_acquire()` never blocks (callers wait their own way: asyncio or time.sleep);
    `release()` deletes the key only if it still holds this holder's token."""

    def __init__(self, store: RedisStateStore, name: str, *, ttl_ms: int = 10_000) -> None:
        self._store = store
        self.key = f"{store.namespace}w:{{lease}}:{name}"
        self.ttl_ms = ttl_ms
        self._token = uuid.uuid4().hex
        self._acquire = store.client.register_script(_ACQUIRE_LUA)
        self._release = store.client.register_script(_RELEASE_LUA)
        self.held = False

    def try_acquire(self) -> bool:
        if self._acquire(keys=[self.key, self.key + ":want"], args=[self._token, self.ttl_ms]):
            self.held = True
            self._store.fence = (self.key, self._token)
        return self.held

    def release(self) -> None:
        self._store.fence = None
        if self.held:
            self.held = False
            self._release(keys=[self.key], args=[self._token])
