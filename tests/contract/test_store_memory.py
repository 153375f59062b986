from __future__ import annotations

from stitcher.engine.store import StateStore
from stitcher.state_memory import MemoryStateStore
from tests.contract.store_contract import StoreContract


class TestMemoryStore(StoreContract):
    def make_store(self) -> StateStore:
        return MemoryStateStore()
