"""The block manager's prefix cache: reuse, eviction through the tree, counters, and greedy
outputs with caching on equal to caching off under every eviction policy."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import KVCacheSpec

BS = 4


def _bm(num_blocks: int = 16, eviction: str = "lru") -> BlockManager:
    pool = TorchKVBackend(KVCacheSpec(num_layers=0, num_kv_heads=1, head_dim=1, block_size=BS,
                                      dtype=torch.float16), num_blocks, torch.device("cpu"))
    return BlockManager(pool, BS, enable_caching=True, eviction=eviction)


def _run(bm: BlockManager, rid: str, tokens: list[int], salt: str | None = None,
         keep: bool = False) -> SequenceState:
    """Admit, compute and (unless ``keep``) finish a request as the scheduler would."""
    seq = SequenceState(rid, tokens, SamplingParams(max_tokens=1), cache_salt=salt)
    bm.acquire_cached_prefix(seq)
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed_blocks(seq)
    if not keep:
        bm.free(seq)
    return seq


def test_reuse_counts_hits_partial_tokens_and_salts() -> None:
    bm = _bm()
    _run(bm, "a", list(range(1, 12)))  # blocks [1..4] [5..8] cached, [9 10 11] not full
    assert bm.num_cached_blocks == 2 and bm.ref_counts == {}
    seq = _run(bm, "b", [1, 2, 3, 4, 5, 6, 0, 0, 0], keep=True)
    assert bm.num_cache_hits == 4 and bm.num_partial_hit_tokens == 2
    other = _run(bm, "c", [1, 2, 3, 4, 9], keep=True)
    assert other.block_table[0] == seq.block_table[0] and bm.ref_counts[seq.block_table[0]] == 2
    bm.free(seq)
    bm.free(other)
    _run(bm, "d", [1, 2, 3, 4, 9], salt="t")
    assert bm.num_cache_hits == 8  # the salted request found nothing
    assert bm.hit_rate == 8 / bm.num_cache_queries


def test_a_prefix_given_back_before_it_ran_is_not_counted_twice() -> None:
    bm = _bm()
    _run(bm, "a", list(range(1, 10)))
    seq = SequenceState("b", list(range(1, 10)), SamplingParams())
    for _ in range(3):  # the scheduler retries while the pool is short
        assert bm.acquire_cached_prefix(seq) == 8
        bm.release_cached_prefix(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert (bm.num_cache_hits, bm.num_cache_queries, bm.num_partial_hit_tokens) == (0, 8, 0)


def test_evicting_a_block_takes_the_blocks_below_it_out_of_the_tree() -> None:
    bm = _bm(num_blocks=8)
    first = SequenceState("a", list(range(1, 10)), SamplingParams())
    twin = SequenceState("b", list(range(1, 14)), SamplingParams())
    for seq in (first, twin):  # both admitted before either is computed: no reuse
        bm.acquire_cached_prefix(seq)
        bm.allocate(seq, seq.num_uncomputed_tokens)
    for seq in (first, twin):
        seq.num_computed_tokens = seq.num_tokens
        bm.register_computed_blocks(seq)
    # The twin's first two blocks duplicate cached ones; its third hangs below the first's.
    assert len(bm.index) == 3 and bm.index.node_of(twin.block_table[2]) is not None
    bm.free(first)
    assert bm.reset_prefix_cache() == 2  # the twin's held block left the tree with them
    assert len(bm.index) == 0 and bm.num_evicted_blocks == 2
    bm.free(twin)
    assert bm.kv.num_free_blocks == 8 and bm.num_cached_blocks == 0 and bm.ref_counts == {}


@pytest.mark.parametrize("eviction", ["lru", "lfu", "s3fifo"])
def test_a_full_pool_evicts_and_hands_every_block_back(eviction: str) -> None:
    bm = _bm(num_blocks=12, eviction=eviction)
    rng = random.Random(1)
    systems = [[rng.randrange(1, 300) for _ in range(8)] for _ in range(3)]
    for i in range(60):
        _run(bm, f"r{i}", systems[i % 3] + [rng.randrange(1, 300) for _ in range(rng.randint(1, 20))])
        assert bm.num_free_blocks == 12 and bm.ref_counts == {}
    assert bm.num_evicted_blocks > 0 and bm.num_cache_hits > 0
    cached = bm.num_cached_blocks
    assert cached == bm.num_blocks - bm.kv.num_free_blocks and bm.reset_prefix_cache() == cached
    assert bm.kv.num_free_blocks == 12 and len(bm.index) == 0


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    """Multi-turn-like prompts: 3 system prompts, conversations that grow, some duplicates."""
    rng = random.Random(7)
    systems = [[rng.randrange(2, 320) for _ in range(rng.randint(20, 40))] for _ in range(3)]
    prompts, convs = [], [list(systems[i % 3]) for i in range(6)]
    for _turn in range(4):
        for conv in convs:
            conv += [rng.randrange(2, 320) for _ in range(rng.randint(3, 18))]
            prompts.append(list(conv))
    return prompts + prompts[:3]


SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def uncached_outputs(tiny_llama_dir: Path, shared_prefix_prompts: list[list[int]]
                     ) -> list[list[int]]:
    plain = LLM(model=str(tiny_llama_dir), num_kv_blocks=40, enable_prefix_caching=False)
    return [o.token_ids for o in plain.generate(shared_prefix_prompts, SP, use_tqdm=False)]


@pytest.mark.parametrize("eviction", ["lru", "lfu", "s3fifo"])
def test_greedy_outputs_with_caching_equal_those_without(
        tiny_llama_dir: Path, eviction: str, shared_prefix_prompts: list[list[int]],
        uncached_outputs: list[list[int]]) -> None:
    sp = SP
    expected = uncached_outputs
    cached = LLM(model=str(tiny_llama_dir), num_kv_blocks=20, kv_eviction=eviction)
    got = []
    for i in range(0, len(shared_prefix_prompts), 4):  # batches of 4: reuse across batches
        got += [o.token_ids for o in cached.generate(shared_prefix_prompts[i:i + 4], sp,
                                                     use_tqdm=False)]
    assert got == expected
    stats = cached.engine.get_stats()
    assert stats.num_prefix_cache_hits > 0 and stats.num_kv_evictions > 0
    assert 0 < stats.prefix_cache_hit_rate < 1
    assert cached.engine.block_manager.ref_counts == {}
