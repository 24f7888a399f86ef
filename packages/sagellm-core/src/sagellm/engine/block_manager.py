"""Logical bookkeeping of the paged KV pool: which sequence holds which block.

Physical blocks come from the :class:`~sagellm.protocols.KVBackend`; this class keeps reference
counts (so a block may be shared, e.g. forked sequences) and each sequence's block table, and
returns a block to the backend when its last reference drops.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.engine.sequence import Sequence
from sagellm.protocols import KVBackend


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    num_free_blocks: int
    block_size: int
    #: Token slots in allocated blocks that hold no token.
    num_wasted_slots: int
    num_allocated_slots: int

    @property
    def usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks

    @property
    def fragmentation(self) -> float:
        """Wasted slots in allocated blocks over allocated slots (internal fragmentation)."""
        return self.num_wasted_slots / self.num_allocated_slots if self.num_allocated_slots else 0.0


class BlockManager:
    def __init__(self, kv: KVBackend, block_size: int) -> None:
        self.kv = kv
        self.block_size = block_size
        self.ref_counts: dict[int, int] = {}
        self._holders: dict[str, Sequence] = {}

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_new_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_new_tokens) + reserve <= self.kv.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_new_tokens`` more tokens."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n:
            ids = self.kv.allocate_blocks(n)
            for i in ids:
                self.ref_counts[i] = 1
            seq.block_table.extend(ids)
        self._holders[seq.request_id] = seq

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of ``parent``'s blocks with ``child`` (copy-on-write by the caller)."""
        for i in parent.block_table:
            self.ref_counts[i] += 1
        child.block_table = list(parent.block_table)
        self._holders[child.request_id] = child

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else holds go back to the pool."""
        release = []
        for i in reversed(seq.block_table):
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                del self.ref_counts[i]
                release.append(i)
        if release:
            self.kv.free_blocks(release)
        seq.block_table = []
        self._holders.pop(seq.request_id, None)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def stats(self) -> BlockStats:
        allocated = sum(len(s.block_table) for s in self._holders.values()) * self.block_size
        used = sum(min(s.num_computed_tokens, len(s.block_table) * self.block_size)
                   for s in self._holders.values())
        # Blocks reserved for tokens about to be computed this step count as used.
        return BlockStats(self.num_blocks, self.kv.num_free_blocks, self.block_size,
                          num_wasted_slots=max(0, allocated - used), num_allocated_slots=allocated)
