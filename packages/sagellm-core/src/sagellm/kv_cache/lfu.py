"""Least frequently used: the block reused by the fewest requests goes first; among equals, the
one released longest ago.

A block's count starts at 1 when it is computed and grows by one per request that reuses it.
Every reuse of a block also reuses the blocks before it, so a prefix never counts less than
what follows it.
"""

from __future__ import annotations

from collections import OrderedDict

from sagellm.kv_cache.eviction import EvictionPolicy


class LFUPolicy(EvictionPolicy):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._count: dict[int, int] = {}
        #: Evictable blocks by count, each bucket oldest release first.
        self._buckets: dict[int, OrderedDict[int, None]] = {}
        self._num_evictable = 0

    def count(self, block: int) -> int:
        return self._count[block]

    def _unqueue(self, block: int) -> None:
        bucket = self._buckets.get(self._count[block])
        if bucket is not None and block in bucket:
            del bucket[block]
            self._num_evictable -= 1
            if not bucket:
                del self._buckets[self._count[block]]

    def on_insert(self, block: int, key: bytes) -> None:
        self._count[block] = 1

    def on_hit(self, block: int) -> None:
        self._unqueue(block)
        self._count[block] += 1

    def on_release(self, block: int) -> None:
        self._buckets.setdefault(self._count[block], OrderedDict())[block] = None
        self._num_evictable += 1

    def evict(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and self._buckets:
            low = min(self._buckets)
            bucket = self._buckets[low]
            block = bucket.popitem(last=False)[0]
            if not bucket:
                del self._buckets[low]
            self._num_evictable -= 1
            del self._count[block]
            out.append(block)
        return out

    def remove(self, block: int) -> None:
        if block in self._count:
            self._unqueue(block)
            del self._count[block]

    @property
    def num_evictable(self) -> int:
        return self._num_evictable
