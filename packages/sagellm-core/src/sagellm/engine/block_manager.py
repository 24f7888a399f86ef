"""Logical bookkeeping of the paged KV pool: which sequence holds which block.

Physical blocks come from the :class:`~sagellm.protocols.KVBackend`; this class keeps reference
counts (so a block may be shared, e.g. forked sequences) and each sequence's block table, and
returns a block to the backend when its last reference drops.

With prefix caching on, every full block is identified by a hash of its tokens and of the hash
of the block before it. A block whose last reference drops keeps its content and stays
allocated in the backend as *evictable*; a later request whose prompt starts with the same
blocks reuses them instead of recomputing them (and a preempted request gets its own blocks
back). Evictable blocks are returned to the backend, least recently used first, only when a
fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sagellm.engine.sequence import SequenceState
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
    def __init__(self, kv: KVBackend, block_size: int, enable_caching: bool = False) -> None:
        self.kv = kv
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts: dict[int, int] = {}
        self._holders: dict[str, SequenceState] = {}
        # Prefix cache: content hash <-> block id, and unreferenced cached blocks in LRU order.
        self._cached: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_cache_queries = 0
        self.num_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can get: free in the backend plus evictable cached ones."""
        return self.kv.num_free_blocks + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._evictable)

    # -- prefix cache ----------------------------------------------------------------------

    def _block_hash(self, parent: int | None, tokens: list[int]) -> int:
        return hash((parent, tuple(tokens)))

    def acquire_cached_prefix(self, seq: SequenceState) -> int:
        """Give a sequence that holds no blocks the cached blocks its tokens start with.

        At least one token is left to compute (its logits are needed). Returns the number of
        tokens found in the cache; ``seq.num_computed_tokens`` is set to it.
        """
        if not self.enable_caching or seq.block_table:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self.num_cache_queries += max_blocks * bs
        parent: int | None = None
        hashes: list[int] = []
        for i in range(max_blocks):
            h = self._block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            if self.ref_counts.get(block, 0) == 0:
                del self._evictable[block]
            self.ref_counts[block] = self.ref_counts.get(block, 0) + 1
            seq.block_table.append(block)
            hashes.append(h)
            parent = h
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hashes) * bs
        self.num_cache_hits += seq.num_computed_tokens
        if seq.block_table:
            self._holders[seq.request_id] = seq
        return seq.num_computed_tokens

    def register_computed_blocks(self, seq: SequenceState) -> None:
        """Hash the blocks of ``seq`` that became full, so later requests can reuse them."""
        if not self.enable_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), full):
            h = self._block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
            parent = h

    def reset_prefix_cache(self) -> int:
        """Return every evictable cached block to the backend; returns how many."""
        n = len(self._evictable)
        self._evict(n)
        return n

    def _evict(self, n: int) -> None:
        release = []
        for _ in range(n):
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            release.append(block)
        if release:
            self.kv.free_blocks(release)

    def _take(self, n: int) -> list[int]:
        short = n - self.kv.num_free_blocks
        if short > 0:
            self._evict(min(short, len(self._evictable)))
        return self.kv.allocate_blocks(n)

    # -- allocation ------------------------------------------------------------------------

    def blocks_needed(self, seq: SequenceState, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_new_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: SequenceState, num_new_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_new_tokens) + reserve <= self.num_free_blocks

    def allocate(self, seq: SequenceState, num_new_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_new_tokens`` more tokens."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n:
            ids = self._take(n)
            for i in ids:
                self.ref_counts[i] = 1
            seq.block_table.extend(ids)
        self._holders[seq.request_id] = seq

    def fork(self, parent: SequenceState, child: SequenceState) -> None:
        """Let ``child`` (same prompt, no blocks yet) share ``parent``'s computed full blocks.

        Only blocks that are full, computed, and hold no token the child must still compute
        itself (its last token, whose logits it samples from) are shared, by reference count;
        the child recomputes the rest (less than a block plus one token) into blocks of its own,
        so no block is ever written by two sequences and no copy-on-write is needed.
        """
        assert not child.block_table, "fork into a sequence that holds no blocks"
        n = min(parent.num_computed_tokens, child.num_tokens - 1) // self.block_size
        shared = parent.block_table[:n]
        for b in shared:
            self.ref_counts[b] += 1
        child.block_table = list(shared)
        child.block_hashes = parent.block_hashes[:n]
        child.num_computed_tokens = n * self.block_size
        if shared:
            self._holders[child.request_id] = child

    @property
    def num_shared_blocks(self) -> int:
        """Blocks held by more than one sequence (forked choices, shared cached prefixes)."""
        return sum(1 for c in self.ref_counts.values() if c > 1)

    def free(self, seq: SequenceState) -> None:
        """Drop ``seq``'s references; blocks nobody else holds go back to the pool.

        Cached (hashed) blocks become evictable instead, the tail of the sequence first in line
        for eviction, so shared prefixes survive longest.
        """
        release = []
        for i in reversed(seq.block_table):
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                del self.ref_counts[i]
                if i in self._hash_of:
                    self._evictable[i] = None
                else:
                    release.append(i)
        if release:
            self.kv.free_blocks(release)
        seq.block_table = []
        seq.block_hashes = []
        self._holders.pop(seq.request_id, None)

    def stats(self) -> BlockStats:
        allocated = sum(len(s.block_table) for s in self._holders.values()) * self.block_size
        used = sum(min(s.num_computed_tokens, len(s.block_table) * self.block_size)
                   for s in self._holders.values())
        # Blocks reserved for tokens about to be computed this step count as used.
        return BlockStats(self.num_blocks, self.num_free_blocks, self.block_size,
                          num_wasted_slots=max(0, allocated - used), num_allocated_slots=allocated)
