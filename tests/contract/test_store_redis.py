"""The StateStore contract against a real Redis (the session's `infra` Redis), plus what only
Redis has: TTLs, the Lua script's byte order, NOSCRIPT recovery, slot-split batches, racing
workers."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from stitcher import state_redis
from stitcher.engine.store import Delete, HMax, HMin, HSetNX, Op, SAdd, SRem, StateStore, ZAdd
from stitcher.state_memory import MemoryStateStore
from stitcher.state_redis import FrameLease, LeaseLostError, RedisStateStore, hash_slot
from tests.contract.store_contract import StoreContract
from tests.redis_cluster import LocalCluster
from weft.config import RedisSettings

pytestmark = pytest.mark.infra

_TEST_DB = 9  # a database of its own, emptied before each test


@pytest.fixture
def redis_settings(infra: Any) -> Iterator[RedisSettings]:
    base: RedisSettings = infra.redis_settings()
    settings = dataclasses.replace(base, url=base.url.rsplit("/", 1)[0] + f"/{_TEST_DB}", key_ttl_s=120)
    client = redis.Redis.from_url(settings.url, **settings.client_kwargs())
    client.flushdb()
    client.close()
    yield settings


class TestRedisStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _settings(self, redis_settings: RedisSettings) -> None:
        self.settings = redis_settings

    def make_store(self) -> StateStore:
        return RedisStateStore(self.settings)


class TestRedisClusterStore(StoreContract):
    """The same contract on a real three-primary Redis Cluster: batches split by hash slot,
    each slot's script call sent to the primary that owns it."""

    @pytest.fixture(autouse=True)
    def _cluster(self, redis_cluster: LocalCluster) -> None:
        redis_cluster.flush()
        self.settings = redis_cluster.settings(key_ttl_s=120)

    def make_store(self) -> StateStore:
        return RedisStateStore(self.settings, cluster=True)


def test_every_written_key_has_the_ttl(redis_settings: RedisSettings) -> None:
    store = RedisStateStore(redis_settings)
    store.apply([HMin("w:{a}:h", "f", "1"), HMax("w:{a}:g", "f", "1"), HSetNX("w:{b}:n", "f", "x"),
                 SAdd("w:{c}:s", ("m", "n")), SRem("w:{c}:s", ("m",))])
    keys = store.client.keys("*")
    assert sorted(keys) == ["w:{a}:g", "w:{a}:h", "w:{b}:n", "w:{c}:s"]
    for key in keys:
        assert 0 < store.client.ttl(key) <= redis_settings.key_ttl_s, key


def test_order_is_bytewise_like_python(redis_settings: RedisSettings) -> None:
    """Lua's `<` follows the server's locale; the store must order exactly as Python str does."""
    rng = random.Random(3)
    alphabet = "09az|AZ _-.é€"
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6))) for _ in range(300)]
    ops: list[Op] = []
    for i, v in enumerate(values):
        ops += [HMin("w:{o}:h", f"lo{i % 7}", v), HMax("w:{o}:h", f"hi{i % 7}", v)]
    redis_store, memory = RedisStateStore(redis_settings), MemoryStateStore()
    redis_store.apply(ops)
    memory.apply(ops)
    assert redis_store.load(["w:{o}:h"]).hashes == memory.load(["w:{o}:h"]).hashes


def test_script_is_reloaded_after_script_flush(redis_settings: RedisSettings) -> None:
    store = RedisStateStore(redis_settings)
    store.client.script_flush()
    store.apply([SAdd("w:{t}:s", ("a",))])
    assert store.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == {"a"}


def test_cluster_split_keeps_each_call_in_one_slot(redis_cluster: LocalCluster) -> None:
    redis_cluster.flush()
    settings = redis_cluster.settings(key_ttl_s=120)
    store = RedisStateStore(settings, cluster=True)
    ops: list[Op] = [SAdd(f"w:{{n{i % 9}}}:s{i}", (str(i),)) for i in range(40)]
    calls = store._calls(ops)
    assert len(calls) == len({hash_slot(op.key) for op in ops})
    for keys, _argv in calls:
        assert len({hash_slot(k) for k in keys}) == 1
    for key in ("a{user1000}b", "{user1000}", "x{}y", "{a}{b}", "a{b", "plain"):
        assert hash_slot(key) == key_slot(key.encode()), key  # redis-py's cluster client agrees
    assert hash_slot("a{user1000}b") == hash_slot("{user1000}")
    store.apply(ops)
    assert store.load(sets=["w:{n3}:s12"]).sets["w:{n3}:s12"] == {"12"}
    owners = {store.client.get_node_from_key(op.key).name for op in ops}
    assert len(owners) == len(redis_cluster.ports)   # the batch really spanned every primary
    for op in ops:
        assert 0 < store.client.ttl(op.key) <= settings.key_ttl_s, op.key


def test_cluster_script_is_reloaded_after_script_flush(redis_cluster: LocalCluster) -> None:
    """A primary that lost the script (restart, SCRIPT FLUSH) gets it again; the batch lands."""
    redis_cluster.flush()
    store = RedisStateStore(redis_cluster.settings(), cluster=True)
    for port in redis_cluster.ports:
        redis_cluster.node(port).script_flush()
    ops: list[Op] = [HSetNX(f"w:{{k{i}}}:h", "f", str(i)) for i in range(30)]
    store.apply(ops)
    loaded = store.load(hashes=[op.key for op in ops]).hashes
    assert loaded == {op.key: {"f": op.value} for op in ops if isinstance(op, HSetNX)}


def test_racing_claims_have_exactly_one_winner(redis_settings: RedisSettings) -> None:
    """Two workers claim the same links at once: every link ends with one owner, never none."""
    links = [f"link{i}" for i in range(200)]
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        store = RedisStateStore(redis_settings)
        barrier.wait()
        for i in range(0, len(links), 20):
            store.apply([HSetNX("w:{claims}:h", link, name) for link in links[i:i + 20]])

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners = RedisStateStore(redis_settings).load(["w:{claims}:h"]).hashes["w:{claims}:h"]
    assert sorted(owners) == sorted(links)
    assert set(owners.values()) <= {"w1", "w2"}


class TestNamespacedRedisStore(StoreContract):
    """The same contract inside a namespace (how replays and tests share one Redis)."""

    @pytest.fixture(autouse=True)
    def _settings(self, redis_settings: RedisSettings) -> None:
        self.settings = redis_settings

    def make_store(self) -> StateStore:
        return RedisStateStore(self.settings, namespace="replay-1:")


def test_namespaces_do_not_meet(redis_settings: RedisSettings) -> None:
    live, replay = RedisStateStore(redis_settings), RedisStateStore(redis_settings, namespace="r:")
    live.apply([SAdd("w:{t}:s", ("live",))])
    replay.apply([SAdd("w:{t}:s", ("replay",))])
    assert live.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == {"live"}
    assert replay.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == {"replay"}
    assert hash_slot("r:w:{t}:s") == hash_slot("w:{t}:s")


def test_lease_is_exclusive_and_fences_writes(redis_settings: RedisSettings) -> None:
    a, b = RedisStateStore(redis_settings), RedisStateStore(redis_settings)
    lease_a, lease_b = a.lease(ttl_ms=200), b.lease(ttl_ms=5000)
    assert lease_a.try_acquire()
    assert not lease_b.try_acquire()
    a.apply([SAdd("w:{t}:s", ("a1",))])  # holder writes
    _hold(lease_b)  # a stalls past its expiry; b takes over
    with pytest.raises(LeaseLostError):
        a.apply([SAdd("w:{t}:s", ("a2-stale",))])
    lease_a.release()  # must not free b's lease
    waiter = a.lease()
    assert not waiter.try_acquire()  # b holds it; waiter is now queued
    b.apply([SAdd("w:{t}:s", ("b1",))])
    lease_b.release()
    assert a.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == {"a1", "b1"}
    assert not lease_b.try_acquire()  # free, but the waiting worker goes first
    assert waiter.try_acquire()
    waiter.release()


def test_cluster_batch_after_a_slot_moved_fails_once_then_lands(redis_cluster: LocalCluster) -> None:
    """A slot moves to another primary (resharding) after the store read the slot map: the batch
    fails with a store error (the worker retries a failed batch whole, and merges are safe to
    redo), the store reads the map again, and the retry lands on the new owner."""
    redis_cluster.flush()
    store = RedisStateStore(redis_cluster.settings(), cluster=True)
    key = "w:{moving}:s"
    store.apply([SAdd(key, ("before",))])
    slot = key_slot(key.encode())
    clients = {port: redis_cluster.node(port) for port in redis_cluster.ports}
    ids = {port: c.execute_command("CLUSTER", "MYID") for port, c in clients.items()}
    source = next(p for p, c in clients.items() if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    target = next(p for p in redis_cluster.ports if p != source)
    clients[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    clients[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                    "AUTH", redis_cluster.password, "KEYS", key)
    for c in clients.values():
        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    with pytest.raises(redis.RedisError):
        store.apply([SAdd(key, ("after",))])
    store.apply([SAdd(key, ("after",))])
    assert clients[target].smembers(key) == {"before", "after"}
    assert store.load(sets=[key]).sets[key] == {"before", "after"}
    for c in clients.values():
        c.close()


def test_cluster_lease_is_exclusive_and_refuses_a_stalled_holder(redis_cluster: LocalCluster) -> None:
    """On Cluster the lease is read just before a batch is written (no script can check it with
    the writes): a holder that stalled past its expiry while computing is refused."""
    redis_cluster.flush()
    settings = redis_cluster.settings()
    a, b = RedisStateStore(settings, cluster=True), RedisStateStore(settings, cluster=True)
    lease_a, lease_b = a.lease(ttl_ms=200), b.lease(ttl_ms=5000)
    assert lease_a.try_acquire()
    assert not lease_b.try_acquire()
    ops: list[Op] = [SAdd(f"w:{{n{i}}}:s", ("a1",)) for i in range(20)]   # keys on every primary
    a.apply(ops)
    _hold(lease_b)  # a stalls past its expiry; b takes over
    with pytest.raises(LeaseLostError):
        a.apply([SAdd("w:{n3}:s", ("a2-stale",))])
    lease_a.release()  # must not free b's lease
    b.apply([SAdd("w:{n3}:s", ("b1",))])
    lease_b.release()
    assert a.load(sets=["w:{n3}:s"]).sets["w:{n3}:s"] == {"a1", "b1"}


def _hold(lease: FrameLease) -> None:
    deadline = time.monotonic() + 5
    while not lease.try_acquire():
        assert time.monotonic() < deadline, "lease never came free"
        time.sleep(0.01)


@pytest.mark.parametrize("seed", [5, 21])   # 21: a flush, then another worker writes the node again
@pytest.mark.parametrize("leased", [False, True], ids=["no-lease", "lease"])
def test_node_mirror_answers_exactly_what_redis_holds(redis_settings: RedisSettings, leased: bool,
                                                      seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers write and read node-local sorted sets (the mirrored kind) in random turns,
    with ties, deletes, other node-local keys and (without a lease) a flush of Redis; every
    floor either worker reads equals what a store without a mirror reads from Redis. Small
    copy limits make trimming and too-long tails happen here too."""
    monkeypatch.setattr(state_redis, "MIRROR_KEEP", 12)
    monkeypatch.setattr(state_redis, "MIRROR_TAIL_MAX", 20)
    rng = random.Random(seed)
    workers = [RedisStateStore(redis_settings), RedisStateStore(redis_settings)]
    truth = RedisStateStore(redis_settings, mirror=False)
    leases = [w.lease(ttl_ms=10_000) for w in workers]
    keys = [f"w:{{p:n{n}|{pid}}}:{lane}" for n in range(3) for pid in (1, 22) for lane in ("t7", "lin:9")]
    holder = -1
    for _ in range(2500):
        w = rng.randrange(2)
        if leased and w != holder:
            if holder >= 0:
                leases[holder].release()
            _hold(leases[w])
            holder = w
        store = workers[w]
        roll = rng.random()
        if roll < 0.45:
            ops: list[Op] = []
            for _ in range(rng.randint(1, 6)):
                key = rng.choice(keys)
                score = rng.randint(0, 400)
                ops.append(ZAdd(key, score, f"{score:06d}|m{rng.randrange(3)}"))
            if rng.random() < 0.2:
                ops.append(HSetNX(f"w:{{p:n{rng.randrange(3)}|1}}:proc", str(rng.randrange(9)), "x"))
            if rng.random() < 0.02:
                ops.append(Delete(rng.choice(keys)))
            store.apply(ops)
        elif roll < 0.995 or leased:
            floors = [(rng.choice(keys), rng.randint(0, 450)) for _ in range(rng.randint(1, 4))]
            got = store.load(floors=floors).floors
            want = truth.load(floors=floors).floors
            assert got == want
            for f in floors:   # what the Txn asks between loads, without a round trip
                local = store.local_floor(*f)
                assert local is None or local == want[f]
        else:
            truth.client.flushdb()
    # both workers write every node here, so the copies are dropped often: still, some answer
    assert sum(w.mirror_hits for w in workers) > 100
    for lease in leases:
        lease.release()
