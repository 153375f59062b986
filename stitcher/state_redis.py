"""RedisStateStore: the engine's StateStore in Redis, shared by every stitcher worker.

One `apply(ops)` is one Lua call (EVALSHA, loaded again on NOSCRIPT) that runs the whole batch
of merge ops atomically and sets the TTL (`RedisSettings.key_ttl_s`) on every key it wrote.
On Redis Cluster (`cluster=True`) a script may only touch keys of one hash slot, so the batch is
split by slot (the engine's `{tag}` keys keep each decision inside one slot) and the per-slot
calls go out in one pipeline. `load()` is one pipeline of HGETALL/SMEMBERS.

Values are compared bytewise in Lua (not with `<`, which uses the server's collation locale)
so Redis orders them exactly as Python orders str, as the contract requires.

`namespace` is put in front of every key (outside the hash tag, so slots do not change): a
replay or a test can stitch into the same Redis without meeting the live state.

`FrameLease` serialises whole engine frames across workers. The engine's merges are safe in any
order, but a frame also *reads* shared state (the watermarks, the due schedule, a parent's
trace, the emitted flag) and then writes based on it; two workers doing that at once could both
emit a span, or each miss the child the other just parked. The lease is a Redis key with an
expiry; while it is held, every `apply` checks in the same Lua call that the lease is still this
worker's (fencing), so a worker that stalled past the expiry cannot write with stale reads.
(On Cluster the lease key lives in its own slot, so there the check is skipped.)
"""

from __future__ import annotations

import binascii
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError

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


def _encode(ops: Sequence[Op], ttl_s: int, ns: str = "",
            fence: tuple[str, str] | None = None) -> tuple[list[str], list[str]]:
    """KEYS and ARGV for one script call running `ops` in order."""
    index: dict[str, int] = {}
    token = ""
    if fence is not None:
        index[fence[0]] = 1
        token = fence[1]
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
    return list(index), [str(ttl_s), token, json.dumps(records, ensure_ascii=False, separators=(",", ":"))]


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


class RedisStateStore(StateStore):
    """StateStore on Redis (standalone, or Cluster with `cluster=True`)."""

    def __init__(self, settings: RedisSettings, *, cluster: bool = False, namespace: str = "",
                 client: Any | None = None, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.cluster = cluster
        self.namespace = namespace
        self.fence: tuple[str, str] | None = None  # (lease key, token) while a FrameLease is held
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
        self.batches = 0

    @property
    def client(self) -> Any:
        return self._redis

    def load(self, hashes: Sequence[str] = (), sets: Sequence[str] = (),
             floors: Sequence[Floor] = ()) -> Snapshot:
        if not hashes and not sets and not floors:
            return Snapshot()
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

    def _calls(self, ops: Sequence[Op]) -> list[tuple[list[str], list[str]]]:
        if not self.cluster:
            return [_encode(ops, self.settings.key_ttl_s, self.namespace, self.fence)]
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
        calls = self._calls(ops)
        try:
            self._run(calls)
        except redis.ResponseError as exc:
            if not isinstance(exc, NoScriptError):
                if "WEFTLEASE" in str(exc):
                    raise LeaseLostError(str(exc)) from None
                raise
            # Redis restarted or SCRIPT FLUSH: load again and re-run; every op is idempotent.
            logger.info("Lua merge script missing on the server; loading it again")
            self._sha = self._redis.script_load(_APPLY_LUA)
            self._run(calls)
        self.batches += 1

    def _run(self, calls: list[tuple[list[str], list[str]]]) -> None:
        if len(calls) == 1:
            keys, argv = calls[0]
            self._redis.evalsha(self._sha, len(keys), *keys, *argv)
            return
        pipe = self._redis.pipeline(transaction=False)
        for keys, argv in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *argv)
        pipe.execute()

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
            if not self._store.cluster:
                self._store.fence = (self.key, self._token)
        return self.held

    def release(self) -> None:
        self._store.fence = None
        if self.held:
            self.held = False
            self._release(keys=[self.key], args=[self._token])
