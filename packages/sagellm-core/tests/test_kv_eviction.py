"""Each eviction policy on a scripted trace, against the order worked out by hand."""

from __future__ import annotations

import pytest

from sagellm.kv_cache.eviction import EvictionPolicy, make_eviction_policy
from sagellm.kv_cache.lfu import LFUPolicy
from sagellm.kv_cache.lru import LRUPolicy
from sagellm.kv_cache.s3fifo import S3FIFOPolicy


def _key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def _cache(policy: EvictionPolicy, *blocks: int) -> None:
    """Insert ``blocks`` (key = block id) and release them in that order."""
    for b in blocks:
        policy.on_insert(b, _key(b))
    for b in blocks:
        policy.on_release(b)


def _reuse(policy: EvictionPolicy, block: int, times: int = 1) -> None:
    for _ in range(times):
        policy.on_hit(block)
        policy.on_release(block)


def test_lru_evicts_the_block_released_longest_ago() -> None:
    p = LRUPolicy(10)
    _cache(p, 1, 2, 3)
    _reuse(p, 1)  # released again: now the most recent
    p.on_insert(4, _key(4))  # held: never a candidate
    assert p.num_evictable == 3
    assert p.evict(2) == [2, 3]
    assert p.evict(5) == [1]
    assert p.evict(1) == [] and p.num_evictable == 0
    p.on_release(4)
    p.remove(4)
    assert p.evict(1) == []


def test_lfu_evicts_the_least_reused_block_oldest_release_first_among_equals() -> None:
    p = LFUPolicy(10)
    _cache(p, 3, 2, 1)  # counts 1, 1, 1
    _reuse(p, 1)  # count 2
    _reuse(p, 2, times=2)  # count 3
    assert (p.count(1), p.count(2), p.count(3)) == (2, 3, 1)
    assert p.evict(1) == [3]
    _cache(p, 4)  # count 1, released after 1 and 2
    p.on_hit(2)  # held: out of the running while held
    assert p.evict(2) == [4, 1]
    assert p.evict(1) == [] and p.num_evictable == 0
    p.on_release(2)
    _cache(p, 5)
    p.remove(5)
    assert p.num_evictable == 1 and p.evict(3) == [2]


def test_s3fifo_filters_blocks_used_once_and_keeps_reused_ones_in_main() -> None:
    p = S3FIFOPolicy(20)  # small queue target: 2 blocks; ghost: 18 keys
    assert (p.small_target, p.ghost_capacity) == (2, 18)
    _cache(p, 1, 2, 3, 4)
    _reuse(p, 2)
    # S = [1 2 3 4] holds its share: its oldest, 1, was never reused -> evicted, key to the ghost.
    assert p.evict(1) == [1] and p.in_ghost(_key(1))
    # S = [2 3 4]: 2 was reused -> moves to main (count reset); 3 is evicted.
    assert p.evict(1) == [3] and p.queue_of(2) == "main" and p.in_ghost(_key(3))
    # S = [4] is under its share: main's oldest, 2 (count 0 since its move), goes.
    assert p.evict(1) == [2] and not p.in_ghost(_key(2))  # main evictions leave no ghost


def test_s3fifo_ghost_hit_enters_main_and_main_reinserts_blocks_with_counts() -> None:
    p = S3FIFOPolicy(20)
    _cache(p, 1, 2, 3)
    assert p.evict(2) == [1, 2] and p.in_ghost(_key(1)) and p.in_ghost(_key(2))
    # Block 5 is computed again with block 1's content: its key is in the ghost -> main.
    p.on_insert(5, _key(1))
    p.on_insert(6, _key(60))
    assert p.queue_of(5) == "main" and p.queue_of(6) == "small" and not p.in_ghost(_key(1))
    p.on_release(5)
    p.on_release(6)
    _reuse(p, 5, times=2)  # count 2
    p.on_insert(7, _key(2))  # ghost hit again -> main, after 5
    p.on_release(7)
    # S = [3 6] holds its share: 3 (never reused) goes.
    assert p.evict(1) == [3]
    # S = [6] is under its share; M = [5 7]: 5 has a count -> back to M's head (count 1); 7 goes.
    assert p.evict(1) == [7]
    # M = [5]: count 1 -> reinserted with 0, then evicted.
    assert p.evict(1) == [5]
    assert p.evict(1) == [6] and p.num_evictable == 0


def test_s3fifo_sets_held_blocks_aside_and_puts_them_back_at_their_queue_end() -> None:
    p = S3FIFOPolicy(20)
    p.on_insert(1, _key(1))
    p.on_insert(2, _key(2))
    p.on_release(2)  # 1 stays held
    assert p.evict(1) == [2]  # 1, the oldest, is held: set aside
    _cache(p, 3)
    p.on_release(1)  # back at the oldest end of the small queue
    assert p.evict(1) == [1]
    p.on_insert(4, _key(4))
    p.remove(4)  # forgotten while held
    p.on_release(3)
    p.remove(99)  # unknown: nothing happens
    assert p.num_evictable == 1 and p.evict(4) == [3]


@pytest.mark.parametrize("name,cls", [("lru", LRUPolicy), ("lfu", LFUPolicy),
                                      ("s3fifo", S3FIFOPolicy)])
def test_policies_are_chosen_by_name(name: str, cls: type) -> None:
    assert isinstance(make_eviction_policy(name, 8), cls)


def test_an_unknown_policy_name_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="lru, lfu, s3fifo"):
        make_eviction_policy("fifo", 8)
