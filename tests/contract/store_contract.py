"""The StateStore contract, once, for every backend (memory here; Redis in test_store_redis.py).

Subclass `StoreContract` and implement `make_store()` (a fresh, empty store per test).
"""

from __future__ import annotations

import itertools
import random

from stitcher.engine.store import FLOOR_LIMIT, Delete, HMax, HMin, HSetNX, Op, SAdd, SRem, StateStore, ZAdd


def _state(store: StateStore, hashes: list[str], sets: list[str]) -> tuple[object, object]:
    snap = store.load(hashes, sets)
    return ({k: sorted(v.items()) for k, v in snap.hashes.items()},
            {k: sorted(v) for k, v in snap.sets.items()})


class StoreContract:
    def make_store(self) -> StateStore:
        raise NotImplementedError

    def test_absent_keys_read_empty(self) -> None:
        snap = self.make_store().load(["w:{t}:h"], ["w:{t}:s"])
        assert snap.hashes == {"w:{t}:h": {}}
        assert snap.sets == {"w:{t}:s": set()}

    def test_hmin_hmax_keep_extremes(self) -> None:
        store = self.make_store()
        store.apply([HMin("w:{t}:h", "lo", "0005|b"), HMax("w:{t}:h", "hi", "0005")])
        store.apply([HMin("w:{t}:h", "lo", "0003|z"), HMax("w:{t}:h", "hi", "0002")])
        store.apply([HMin("w:{t}:h", "lo", "0003|a"), HMax("w:{t}:h", "hi", "0009")])
        assert store.load(["w:{t}:h"]).hashes["w:{t}:h"] == {"lo": "0003|a", "hi": "0009"}

    def test_hsetnx_first_writer_wins(self) -> None:
        store = self.make_store()
        store.apply([HSetNX("w:{t}:h", "f", "one")])
        store.apply([HSetNX("w:{t}:h", "f", "two"), HSetNX("w:{t}:h", "g", "x")])
        assert store.load(["w:{t}:h"]).hashes["w:{t}:h"] == {"f": "one", "g": "x"}

    def test_set_union_and_removal(self) -> None:
        store = self.make_store()
        store.apply([SAdd("w:{t}:s", ("a", "b")), SAdd("w:{t}:s", ("b", "c"))])
        store.apply([SRem("w:{t}:s", ("a", "zz"))])
        assert store.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == {"b", "c"}
        store.apply([SRem("w:{t}:s", ("b", "c"))])
        assert store.load(sets=["w:{t}:s"]).sets["w:{t}:s"] == set()

    def test_delete_drops_hash_and_set(self) -> None:
        store = self.make_store()
        store.apply([HSetNX("w:{t}:h", "f", "v"), SAdd("w:{t}:s", ("m",))])
        store.apply([Delete("w:{t}:h"), Delete("w:{t}:s"), Delete("w:{t}:never")])
        snap = store.load(["w:{t}:h"], ["w:{t}:s"])
        assert snap.hashes["w:{t}:h"] == {} and snap.sets["w:{t}:s"] == set()

    def test_load_reflects_applied_batches(self) -> None:
        store = self.make_store()
        store.apply([HSetNX("w:{t}:h", "f", "v"), SAdd("w:{t}:s", ("m",))])
        assert _state(store, ["w:{t}:h"], ["w:{t}:s"]) == ({"w:{t}:h": [("f", "v")]}, {"w:{t}:s": ["m"]})
        store.apply([HSetNX("w:{t}:h", "g", "x"), SAdd("w:{t}:s", ("n",))])
        assert _state(store, ["w:{t}:h"], ["w:{t}:s"]) == (
            {"w:{t}:h": [("f", "v"), ("g", "x")]}, {"w:{t}:s": ["m", "n"]})

    def test_merges_are_order_and_redelivery_independent(self) -> None:
        """Any order of the merge batches, each applied once or twice, gives one state."""
        rng = random.Random(7)
        keys_h = [f"w:{{k{i}}}:h" for i in range(3)]
        keys_s = [f"w:{{k{i}}}:s" for i in range(3)]
        batches: list[list[Op]] = []
        for _ in range(6):
            batch: list[Op] = []
            for _ in range(5):
                k = rng.randrange(3)
                v = f"{rng.randrange(100):04d}"
                options: list[Op] = [HMin(keys_h[k], f"f{k}", v), HMax(keys_h[k], f"g{k}", v),
                                     SAdd(keys_s[k], (v,))]
                batch.append(rng.choice(options))
                batch.append(HSetNX(keys_h[k], f"n{v}", f"det-{v}"))
            batches.append(batch)
        states = set()
        for order in itertools.islice(itertools.permutations(range(len(batches))), 0, 720, 97):
            store = self.make_store()
            for i in order:
                store.apply(batches[i])
                if i % 2:
                    store.apply(batches[i])  # redelivery
            states.add(repr(_state(store, keys_h, keys_s)))
        assert len(states) == 1

    def test_apply_rejects_unknown_op(self) -> None:
        store = self.make_store()
        try:
            store.apply(["not an op"])  # type: ignore[list-item]
        except (TypeError, ValueError):
            return
        raise AssertionError("a bad op must raise")

    def test_zset_floor_returns_highest_scores_at_or_below(self) -> None:
        store = self.make_store()
        store.apply([ZAdd("w:{t}:z", 10, "a"), ZAdd("w:{t}:z", 30, "c"), ZAdd("w:{t}:z", 20, "b")])
        store.apply([ZAdd("w:{t}:z", 40, "d"), ZAdd("w:{t}:z", 20, "b")])  # re-add: no-op
        snap = store.load(floors=[("w:{t}:z", 35), ("w:{t}:z", 5), ("w:{t}:none", 99),
                                  ("w:{t}:z", 100)])
        assert snap.floors[("w:{t}:z", 35)] == [(30, "c"), (20, "b"), (10, "a")]
        assert snap.floors[("w:{t}:z", 5)] == []
        assert snap.floors[("w:{t}:none", 99)] == []
        assert snap.floors[("w:{t}:z", 100)] == [(40, "d"), (30, "c"), (20, "b"), (10, "a")]

    def test_zset_floor_is_limited_and_orders_ties_by_member_descending(self) -> None:
        store = self.make_store()
        store.apply([ZAdd("w:{t}:z", i // 2, f"m{i:02d}") for i in range(FLOOR_LIMIT + 4)])
        got = store.load(floors=[("w:{t}:z", 10**6)]).floors[("w:{t}:z", 10**6)]
        everything = sorted(((i // 2, f"m{i:02d}") for i in range(FLOOR_LIMIT + 4)), reverse=True)
        assert got == everything[:FLOOR_LIMIT]

    def test_zset_large_scores_and_delete(self) -> None:
        store = self.make_store()
        big = 1_760_000_000_000_000   # Unix µs: what the engine stores
        store.apply([ZAdd("w:{t}:z", big + 1, "x"), ZAdd("w:{t}:z", big + 2, "y")])
        assert store.load(floors=[("w:{t}:z", big + 1)]).floors[("w:{t}:z", big + 1)] == [(big + 1, "x")]
        store.apply([Delete("w:{t}:z")])
        assert store.load(floors=[("w:{t}:z", big + 9)]).floors[("w:{t}:z", big + 9)] == []
