"""Least recently used: the block released longest ago goes first.

Recency is the time of release: a request frees its blocks tail first
(``BlockManager.free``), so a shared prefix is always more recent than the blocks after it and
outlives them.
"""

from __future__ import annotations

from collections import OrderedDict

from sagellm.kv_cache.eviction import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first

    def on_insert(self, block: int, key: bytes) -> None:
        pass  # held by its creator: nothing to order yet

    def on_hit(self, block: int) -> None:
        self._evictable.pop(block, None)

    def on_release(self, block: int) -> None:
        self._evictable[block] = None

    def evict(self, n: int) -> list[int]:
        return [self._evictable.popitem(last=False)[0] for _ in range(min(n, len(self._evictable)))]

    def remove(self, block: int) -> None:
        self._evictable.pop(block, None)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)
