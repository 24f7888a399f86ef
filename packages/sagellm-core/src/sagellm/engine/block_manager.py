"""Logical bookkeeping of the paged KV pool: which sequence holds which block.

Physical blocks come from the :class:`~sagellm.protocols.KVBackend`; this class keeps reference
counts (so a block may be shared, e.g. forked sequences) and each sequence's block table, and
returns a block to the backend when its last reference drops.

With prefix caching on, every full block gets a key chained over the blocks before it and the
request's ``cache_salt`` (``sagellm.kv_cache.block_hash``) and is indexed in a radix tree
(``sagellm.kv_cache.radix``). A cached block whose last reference drops keeps its content and
stays allocated in the backend as *evictable*; a later request whose prompt starts with the same
blocks (same salt) reuses them instead of recomputing them (and a preempted request gets its own
blocks back). Evictable blocks go back to the backend only when a fresh block is needed, in the
order of the eviction policy (``sagellm.kv_cache.eviction``: LRU, LFU or S3-FIFO).

A prompt that matches only part of a cached block recomputes that block's tokens: the KV
backend has no block copy (it left the contract), and a copy would have to reach every rank of
a tensor-parallel engine through the step plan, for at most ``block_size - 1`` tokens.
``num_partial_hit_tokens`` counts the tokens recomputed that way.

With ``kv_window`` (a model whose every layer has a sliding window, the largest of them), a
query at position ``p`` reads only keys after ``p - kv_window``, so a running sequence's blocks
wholly before the window of its next token are of no further use: :meth:`release_out_of_window`
drops them and puts ``NO_BLOCK`` in their table entries (entries keep their positions, so
``block_table[p // block_size]`` stays the block of position ``p``). A dropped block goes the way
of any released one: freed, or, if the prefix cache indexes it, kept as evictable, so it is
never handed out while the index can still give it to a request, and serves a later prompt
that shares only the blocks up to its window. The index's chains start at the first block, and a
windowed sequence drops its first blocks first, so they are the oldest evictable blocks: an
eviction that took everything below them (as it does without a window) would let a long prompt's
own dropped head destroy its whole cached chain. So with a window, evicting a block that has
blocks below it frees only its KV and leaves a hollow node (``sagellm.kv_cache.radix``) on the
path; a match is used up to the longest prefix whose window holds no hollow block
(``_usable_match``). Freeing dropped blocks at once instead would lose the short-prefix reuse
and gain nothing: evictable blocks count as free and go first anyway. ``fork`` shares no block
that the child would read past a dropped one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.engine.sequence import SequenceState
from sagellm.kv_cache.block_hash import block_key, root_key
from sagellm.kv_cache.eviction import EvictionPolicy, make_eviction_policy
from sagellm.kv_cache.radix import RadixIndex, RadixNode
from sagellm.protocols import NO_BLOCK, KVBackend


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
    def __init__(self, kv: KVBackend, block_size: int, enable_caching: bool = False,
                 eviction: str | EvictionPolicy = "lru", kv_window: int | None = None) -> None:
        if kv_window is not None and (isinstance(kv_window, bool) or not isinstance(kv_window, int)
                                      or kv_window < 1):
            raise ValueError(f"kv_window must be a positive integer or None, got {kv_window!r}")
        self.kv = kv
        self.block_size = block_size
        self.enable_caching = enable_caching
        #: Keys a query sees at most (every layer windowed); ``None``: every block is kept.
        self.kv_window = kv_window
        #: Blocks given back by :meth:`release_out_of_window`.
        self.num_window_released_blocks = 0
        self.ref_counts: dict[int, int] = {}
        self._holders: dict[str, SequenceState] = {}
        self.index = RadixIndex(block_size)
        self.eviction = (eviction if isinstance(eviction, EvictionPolicy)
                         else make_eviction_policy(eviction, kv.num_blocks))
        #: Prompt tokens looked up in the cache (all but the last of each admitted prompt, in
        #: whole blocks) and those found: the prefix cache's hit rate is their ratio.
        self.num_cache_queries = 0
        self.num_cache_hits = 0
        #: Tokens that matched part of a cached block and were recomputed (see the module doc).
        self.num_partial_hit_tokens = 0
        #: Cached blocks given back to the backend to make room.
        self.num_evicted_blocks = 0
        self._partial_hits: dict[str, int] = {}  # of the last lookup, until the sequence ends

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can get: free in the backend plus evictable cached ones."""
        return self.kv.num_free_blocks + self.eviction.num_evictable

    @property
    def num_cached_blocks(self) -> int:
        """Evictable cached blocks (held ones are counted as in use)."""
        return self.eviction.num_evictable

    @property
    def hit_rate(self) -> float:
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0

    # -- prefix cache ----------------------------------------------------------------------

    def _keys(self, seq: SequenceState, start: int, stop: int) -> list[bytes]:
        """Keys of ``seq``'s full blocks ``start .. stop-1``, chained on those it has."""
        bs = self.block_size
        parent = seq.block_hashes[start - 1] if start else root_key(seq.cache_salt)
        keys = []
        for i in range(start, stop):
            parent = block_key(parent, seq.token_ids[i * bs:(i + 1) * bs])
            keys.append(parent)
        return keys

    def acquire_cached_prefix(self, seq: SequenceState) -> int:
        """Give a sequence that holds no blocks the cached blocks its tokens start with.

        At least one token is left to compute (its logits are needed). Returns the number of
        tokens found in the cache; ``seq.num_computed_tokens`` is set to it.
        """
        if not self.enable_caching or seq.block_table:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        found = self.index.match(root_key(seq.cache_salt), seq.token_ids, seq.num_tokens - 1)
        n = self._usable_match(found.nodes)
        partial = found.num_partial_tokens if n == len(found.nodes) else 0
        # The part of the hit before the window is never read: it stays unreferenced.
        first = self.first_window_block(n * bs)
        seq.block_table = [NO_BLOCK] * first
        seq.num_released_blocks = first
        for node in found.nodes[first:n]:
            self.eviction.on_hit(node.block)
            self.ref_counts[node.block] = self.ref_counts.get(node.block, 0) + 1
            seq.block_table.append(node.block)
        seq.block_hashes = [node.key for node in found.nodes[:n]]
        seq.num_computed_tokens = n * bs
        self.num_cache_queries += max_blocks * bs
        self.num_cache_hits += seq.num_computed_tokens
        self.num_partial_hit_tokens += partial
        self._partial_hits[seq.request_id] = partial
        if n > first:
            self._holders[seq.request_id] = seq
        return seq.num_computed_tokens

    def _usable_match(self, nodes: list[RadixNode]) -> int:
        """How many of the matched ``nodes`` a sequence may take: the most whose blocks from the
        window of the next token on all hold KV (hollow ones before it are never read)."""
        n = len(nodes)
        while n and any(node.is_hollow for node in
                        nodes[self.first_window_block(n * self.block_size):n]):
            n -= 1
        return n

    def release_cached_prefix(self, seq: SequenceState) -> None:
        """Undo :meth:`acquire_cached_prefix` for a sequence that could not start after all
        (it is looked up again when it can), so the hit counters count each admission once."""
        if self.enable_caching:
            bs = self.block_size
            self.num_cache_queries -= (seq.num_tokens - 1) // bs * bs
            self.num_cache_hits -= seq.num_computed_tokens
            self.num_partial_hit_tokens -= self._partial_hits.get(seq.request_id, 0)
        self.free(seq)
        seq.num_computed_tokens = 0

    def register_computed_blocks(self, seq: SequenceState) -> None:
        """Index the blocks of ``seq`` that became full, so later requests can reuse them."""
        if not self.enable_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        start = len(seq.block_hashes)
        for i, key in enumerate(self._keys(seq, start, full), start):
            parent = seq.block_hashes[-1] if i else root_key(seq.cache_salt)
            block = seq.block_table[i]
            if block != NO_BLOCK and self.index.insert(parent, key, seq.token_ids[i * bs:(i + 1) * bs], block,
                                 first=i == 0):
                self.eviction.on_insert(block, key)
            seq.block_hashes.append(key)

    def reset_prefix_cache(self) -> int:
        """Return every evictable cached block to the backend; returns how many."""
        n = self.eviction.num_evictable
        self._evict(n)
        return n

    def _evict(self, n: int) -> int:
        """Give back at least ``n`` evictable blocks (if there are); returns how many went.

        A block leaves the index with every block below it: those no request holds are freed
        too, held ones become plain blocks that are freed when released. With a window, a block
        with blocks below it leaves only its KV (a hollow node, see the module doc).
        """
        release = []
        for victim in self.eviction.evict(n):
            node = self.index.node_of(victim)
            if node is None:
                continue  # below an earlier victim: gone with it
            if self.kv_window is not None and node.num_children:
                self.index.hollow(victim)  # a path to the blocks below (see the module doc)
                release.append(victim)
                continue
            for block in self.index.remove_subtree(victim):
                if block != victim:
                    self.eviction.remove(block)
                if self.ref_counts.get(block, 0) == 0:
                    release.append(block)
        if release:
            self.kv.free_blocks(release)
            self.num_evicted_blocks += len(release)
        return len(release)

    def _take(self, n: int) -> list[int]:
        short = n - self.kv.num_free_blocks
        while short > 0 and self.eviction.num_evictable:
            short -= self._evict(min(short, self.eviction.num_evictable))
        return self.kv.allocate_blocks(n)

    # -- sliding window --------------------------------------------------------------------

    def first_window_block(self, num_computed_tokens: int) -> int:
        """Index of the first block that a query at ``num_computed_tokens`` or later can read
        (0 without a window): the block of key ``num_computed_tokens - kv_window + 1``."""
        if self.kv_window is None:
            return 0
        return max(0, num_computed_tokens - self.kv_window + 1) // self.block_size

    def release_out_of_window(self, seq: SequenceState) -> int:
        """Give back ``seq``'s blocks that no query from its next token on can read; their
        entries become ``NO_BLOCK``. Returns how many went (0 without a window).

        Called by the scheduler for each running sequence before it plans a step, and for a
        sequence given a cached prefix: queries only move forward (a preempted sequence
        recomputes from its first uncached block), so a dropped block is never needed again.
        """
        stop = min(self.first_window_block(seq.num_computed_tokens), len(seq.block_table))
        start = seq.num_released_blocks
        if stop <= start:
            return 0
        dropped = seq.block_table[start:stop]
        seq.block_table[start:stop] = [NO_BLOCK] * (stop - start)
        seq.num_released_blocks = stop
        self._unref(dropped)
        self.num_window_released_blocks += stop - start
        return stop - start

    def max_blocks_held(self, num_tokens: int, chunk: int) -> int:
        """Most blocks one sequence of ``num_tokens`` tokens holds at once while it is computed
        in steps of at most ``chunk`` tokens (prefill chunks, then one-token decodes).

        Without a window: all of them. With one, a step from position ``c`` holds the blocks of
        keys ``c - kv_window + 1 .. c + n - 1`` (the scheduler releases the rest before it
        plans): at most ``kv_window - 1 + chunk`` consecutive tokens, which touch at most
        ``(span + block_size - 2) // block_size + 1`` blocks where they straddle block edges.
        """
        if num_tokens < 1 or chunk < 1:
            raise ValueError(f"num_tokens and chunk must be positive, got {num_tokens}, {chunk}")
        bs = self.block_size
        whole = -(-num_tokens // bs)
        if self.kv_window is None:
            return whole
        span = min(num_tokens, self.kv_window - 1 + chunk)
        return min(whole, (span + bs - 2) // bs + 1)

    # -- allocation ------------------------------------------------------------------------

    def blocks_needed(self, seq: SequenceState, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_new_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: SequenceState, num_new_tokens: int, reserve: int = 0) -> bool:
        need = self.blocks_needed(seq, num_new_tokens) + reserve
        return need == 0 or need <= self.num_free_blocks  # most decodes need no block

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
        # With a window the child reads from ``first`` on; the parent may have dropped blocks
        # before its own window, which starts later (then the child recomputes everything).
        first = self.first_window_block(n * self.block_size)
        if first < parent.num_released_blocks:
            n = first = 0
        shared = parent.block_table[first:n]
        for b in shared:
            self.ref_counts[b] += 1
        child.block_table = [NO_BLOCK] * first + shared
        child.num_released_blocks = first
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
        self._unref(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_released_blocks = 0
        seq.block_hashes = []
        self._holders.pop(seq.request_id, None)
        self._partial_hits.pop(seq.request_id, None)

    def _unref(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks`` (``NO_BLOCK`` entries skipped), in order;
        a block nobody holds is freed, or becomes evictable if the prefix cache indexes it."""
        release = []
        for i in blocks:
            if i == NO_BLOCK:
                continue
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                del self.ref_counts[i]
                if self.index.node_of(i) is not None:
                    self.eviction.on_release(i)
                else:
                    release.append(i)
        if release:
            self.kv.free_blocks(release)

    @property
    def num_held_blocks(self) -> int:
        """Blocks some sequence holds (neither free nor evictable)."""
        return self.num_blocks - self.num_free_blocks

    def stats(self) -> BlockStats:
        bs = self.block_size
        holders = self._holders.values()
        allocated = sum(len(s.block_table) - s.num_released_blocks for s in holders) * bs
        used = sum(max(0, min(s.num_computed_tokens, len(s.block_table) * bs)
                       - s.num_released_blocks * bs) for s in holders)
        # Blocks reserved for tokens about to be computed this step count as used.
        return BlockStats(self.num_blocks, self.num_free_blocks, self.block_size,
                          num_wasted_slots=max(0, allocated - used), num_allocated_slots=allocated)
