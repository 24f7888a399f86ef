"""The radix index: longest cached prefix to the token, per-salt roots, tokens compared on a hit."""

from __future__ import annotations

from sagellm.kv_cache.block_hash import block_key, root_key
from sagellm.kv_cache.radix import RadixIndex

ROOT = root_key(None)


def _chain(index: RadixIndex, blocks: list[list[int]], ids: list[int], salt: str | None = None
           ) -> list[bool]:
    """Index a chain of blocks as the block manager does; which of them were indexed."""
    parent, indexed = root_key(salt), []
    for i, (tokens, block) in enumerate(zip(blocks, ids)):
        key = block_key(parent, tokens)
        indexed.append(index.insert(parent, key, tokens, block, first=i == 0))
        parent = key
    return indexed


def test_longest_match_counts_whole_blocks_then_the_partly_matching_one() -> None:
    index = RadixIndex(4)
    assert _chain(index, [[1, 2, 3, 4], [5, 6, 7, 8]], [10, 11]) == [True, True]
    # The first block is cached already (block 10): 12 is not indexed; 13 hangs below 10.
    assert _chain(index, [[1, 2, 3, 4], [5, 6, 0, 0]], [12, 13]) == [False, True]
    assert len(index) == 3 and index.node_of(12) is None
    m = index.match(ROOT, [1, 2, 3, 4, 5, 6, 9, 9, 9], 8)
    assert m.blocks == [10] and m.num_partial_tokens == 2
    m = index.match(ROOT, [1, 2, 3, 4, 5, 6, 7, 8, 0], 8)
    assert m.blocks == [10, 11] and m.num_partial_tokens == 0
    # The last token is never matched (its logits are needed): 7 tokens -> one block + 3.
    m = index.match(ROOT, [1, 2, 3, 4, 5, 6, 7, 8], 7)
    assert m.blocks == [10] and m.num_partial_tokens == 3
    assert index.match(ROOT, [2, 2, 3, 4, 5], 4).blocks == []
    assert index.match(ROOT, [1, 2, 3], 2).num_partial_tokens == 2


def test_each_salt_has_its_own_tree() -> None:
    index = RadixIndex(4)
    _chain(index, [[1, 2, 3, 4]], [10], salt="tenant-a")
    prompt = [1, 2, 3, 4, 5]
    assert index.match(root_key("tenant-a"), prompt, 4).blocks == [10]
    assert index.match(root_key("tenant-b"), prompt, 4).blocks == []
    assert index.match(ROOT, prompt, 4).blocks == []
    _chain(index, [[1, 2, 3, 4]], [11])
    assert index.match(ROOT, prompt, 4).blocks == [11] and index.num_roots == 2


def test_a_key_hit_with_other_tokens_is_a_miss() -> None:
    """Even a forged key (as a hash collision would give) cannot hand out other tokens' KV."""
    index = RadixIndex(4)
    forged = block_key(ROOT, [9, 9, 9, 9])  # the key of [9 9 9 9] ...
    assert index.insert(ROOT, forged, [1, 2, 3, 4], 10, first=True)  # ... over [1 2 3 4]'s KV
    assert forged in index
    m = index.match(ROOT, [9, 9, 9, 9, 1], 4)
    assert m.blocks == [] and m.num_partial_tokens == 0


def test_removing_a_block_removes_what_hangs_below_it_and_an_empty_root() -> None:
    index = RadixIndex(2)
    _chain(index, [[1, 2], [3, 4], [5, 6]], [10, 11, 12])
    assert _chain(index, [[1, 2], [3, 9]], [14, 13]) == [False, True]
    parent = block_key(ROOT, [1, 2])
    assert index.node_of(10).num_children == 2
    assert index.remove_subtree(11) == [11, 12]
    assert index.node_of(12) is None and index.node_of(10).num_children == 1
    assert not index.insert(block_key(parent, [3, 4]), b"k" * 32, [7, 7], 14, first=False)
    assert sorted(index.remove_subtree(10)) == [10, 13]
    assert len(index) == 0 and index.num_roots == 0


def test_a_hollow_node_keeps_the_path_and_is_filled_or_pruned() -> None:
    from sagellm.protocols import NO_BLOCK

    index = RadixIndex(4)
    chain = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    _chain(index, chain, [10, 11, 12])
    _chain(index, [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]], [10, 11, 13])  # a branch below 11
    index.hollow(10)
    index.hollow(11)
    assert index.node_of(10) is None and len(index) == 4
    m = index.match(ROOT, [t for b in chain for t in b] + [0], 12)
    assert m.blocks == [NO_BLOCK, NO_BLOCK, 12] and m.nodes[0].is_hollow
    # Another block with the hollow node's content fills it; one with a different key does not.
    assert _chain(index, chain[:1], [20]) == [True] and index.node_of(20) is m.nodes[0]
    index.hollow(20)
    # Removing a leaf keeps hollow ancestors that still lead somewhere, drops the others.
    assert index.remove_subtree(12) == [12] and len(index) == 3
    assert index.remove_subtree(13) == [13]
    assert len(index) == 0 and index.num_roots == 0
    # A subtree that contains hollow nodes returns only the blocks that hold KV.
    _chain(index, chain, [10, 11, 12])
    index.hollow(11)
    assert index.remove_subtree(10) == [10, 12] and len(index) == 0
