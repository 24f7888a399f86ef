"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO that filters blocks used once, a main FIFO
with lazy reinsertion, and a ghost FIFO of keys recently filtered out.

New blocks enter the small queue (S, a tenth of the pool). A reuse sets a counter (capped at 3);
nothing moves on a hit. When a block is needed: if S holds at least its tenth, its oldest block
is looked at: reused since it came in, it moves to the main queue (M) with its counter reset;
never reused, it is evicted and its key goes into the ghost queue (G). Otherwise M's oldest is
looked at: with a count left, it goes back to M's head with the count lowered; without, it is
evicted. A block computed again while its key is in G was evicted too early: it goes straight
into M. G remembers as many keys as M may hold.

Blocks held by a request cannot go. One that reaches the end of its queue while held is set
aside and returns to that end when released, so its place in the order is kept without
scanning held blocks on every eviction.
"""

from __future__ import annotations

from collections import OrderedDict

from sagellm.kv_cache.eviction import EvictionPolicy

_SMALL, _MAIN = "small", "main"
MAX_COUNT = 3


class S3FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        super().__init__(capacity)
        self.small_target = max(1, int(capacity * small_fraction))
        self.ghost_capacity = max(1, capacity - self.small_target)
        # Each queue's oldest block first (evicted from the front, inserted at the back).
        self._queues: dict[str, OrderedDict[int, None]] = {_SMALL: OrderedDict(), _MAIN: OrderedDict()}
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._where: dict[int, str] = {}
        self._count: dict[int, int] = {}
        self._key: dict[int, bytes] = {}
        self._evictable: set[int] = set()
        #: Held blocks taken off a queue's end, by queue.
        self._aside: dict[int, str] = {}

    # -- what tests and reports read -------------------------------------------------------

    def queue_of(self, block: int) -> str | None:
        return self._where.get(block)

    def in_ghost(self, key: bytes) -> bool:
        return key in self._ghost

    # -- the hooks -------------------------------------------------------------------------

    def on_insert(self, block: int, key: bytes) -> None:
        queue = _SMALL
        if key in self._ghost:
            del self._ghost[key]
            queue = _MAIN
        self._queues[queue][block] = None
        self._where[block] = queue
        self._count[block] = 0
        self._key[block] = key

    def on_hit(self, block: int) -> None:
        self._count[block] = min(self._count[block] + 1, MAX_COUNT)
        self._evictable.discard(block)

    def on_release(self, block: int) -> None:
        self._evictable.add(block)
        queue = self._aside.pop(block, None)
        if queue is not None:
            q = self._queues[queue]
            q[block] = None
            q.move_to_end(block, last=False)

    def evict(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and self._evictable:
            small_first = len(self._queues[_SMALL]) >= self.small_target or not self._queues[_MAIN]
            block = self._evict_small() if small_first else self._evict_main()
            if block is None:
                block = self._evict_main() if small_first else self._evict_small()
            if block is None:  # pragma: no cover - every evictable block is in a queue
                break
            out.append(block)
        return out

    def remove(self, block: int) -> None:
        queue = self._where.pop(block, None)
        if queue is None:
            return
        self._queues[queue].pop(block, None)
        self._aside.pop(block, None)
        self._evictable.discard(block)
        del self._count[block], self._key[block]

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    # -- the two queues' ends --------------------------------------------------------------

    def _oldest(self, queue: str) -> int | None:
        """The queue's oldest evictable block, setting held ones aside; None if none."""
        q = self._queues[queue]
        while q:
            block = next(iter(q))
            if block in self._evictable:
                return block
            del q[block]
            self._aside[block] = queue
        return None

    def _evict_small(self) -> int | None:
        while (block := self._oldest(_SMALL)) is not None:
            del self._queues[_SMALL][block]
            if self._count[block] > 0:
                self._queues[_MAIN][block] = None
                self._where[block] = _MAIN
                self._count[block] = 0
                continue
            self._ghost[self._key[block]] = None
            while len(self._ghost) > self.ghost_capacity:
                self._ghost.popitem(last=False)
            self._forget(block)
            return block
        return None

    def _evict_main(self) -> int | None:
        q = self._queues[_MAIN]
        while (block := self._oldest(_MAIN)) is not None:
            if self._count[block] > 0:
                self._count[block] -= 1
                q.move_to_end(block)
                continue
            del q[block]
            self._forget(block)
            return block
        return None

    def _forget(self, block: int) -> None:
        self._evictable.discard(block)
        del self._where[block], self._count[block], self._key[block]
