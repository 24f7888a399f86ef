"""The free list of a paged pool: which block ids are handed out, which are free.

Every KV pool keeps one (each backend's device pool, and the disaggregated engine's pool mirror),
so the checks that catch a double free or a foreign id live here once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from sagellm.protocols import KVPoolExhausted


class BlockFreeList:
    """Block ids ``0 .. num_blocks - 1``; freed ids are reused last (FIFO), which spreads wear over
    the pool and keeps a just-freed block's contents around for as long as possible."""

    def __init__(self, num_blocks: int, what: str = "KV block") -> None:
        self.num_blocks = num_blocks
        #: Names the blocks in error messages ("prefill KV block" for a pool mirror).
        self.what = what
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` free ids; raises :class:`KVPoolExhausted`, taking none, if fewer are free."""
        if num_blocks > len(self._free):
            raise KVPoolExhausted(f"asked for {num_blocks} {self.what}s, {len(self._free)} are free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        for i in ids:
            self._allocated[i] = 1
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Take ids back; one that is not allocated is the caller's bug and raises ``ValueError``."""
        for i in block_ids:
            if not 0 <= i < self.num_blocks or not self._allocated[i]:
                raise ValueError(f"{self.what} {i} is not allocated")
            self._allocated[i] = 0
            self._free.append(i)
