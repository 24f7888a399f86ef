"""Sliding-window attention in the paged KV cache: blocks wholly before every layer's window are
given back as a sequence moves on, greedy tokens still equal transformers' (fp32), and the
prefix cache, forks and preemption stay correct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import NO_BLOCK, Capabilities, KVCacheSpec
from sagellm.sampling_params import SamplingParams
from sagellm.testing.families import hf_greedy, save_tiny_family
from sagellm.testing.tiny_model import greedy_engine, run_greedy
from sagellm.testing.window import run_windowed, window_block_bound

BS = 4
NEW_TOKENS = 20


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in (21, 30, 6)]


@pytest.fixture(scope="module", params=[3, 4], ids=lambda w: f"window-{w}")
def mistral(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[int, Path, list[list[int]]]:
    """A tiny Mistral with a window below and at the block size (4; above it: the long decode
    test), and transformers' greedy tokens for it."""
    window = request.param
    path = save_tiny_family(tmp_path_factory.mktemp(f"mistral-w{window}"), "mistral",
                            sliding_window=window)
    want, _ = hf_greedy(path, _prompts(), NEW_TOKENS)
    return window, path, want


def test_mistral_matches_transformers_with_bounded_blocks(mistral) -> None:  # type: ignore[no-untyped-def]
    window, path, want = mistral
    run = run_windowed(CpuPlatform(), path, _prompts(), NEW_TOKENS)
    assert run.tokens == want
    assert run.violations == []
    assert run.num_released_blocks > 0
    # 3 sequences, none holding more than its window and one 16-token chunk span: far less
    # than the 5 + 7 + 3 = 15 blocks the longest of them reach with every block kept.
    assert run.max_held_blocks <= 3 * window_block_bound(window, BS, 16)
    long_seq_blocks = -(-(30 + NEW_TOKENS) // BS)
    assert run.max_held_blocks < long_seq_blocks


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_preemption_mid_sequence(mistral, caching: bool) -> None:  # type: ignore[no-untyped-def]
    """Sequences preempted while decoding, after they released blocks, recompute (from
    scratch, or from what the prefix cache still chains from their first block) and still
    produce transformers' tokens."""
    window, path, want = mistral
    run = run_windowed(CpuPlatform(), path, _prompts(), NEW_TOKENS, preempt_every=7,
                       enable_prefix_caching=caching, num_kv_blocks=12)
    assert run.tokens == want
    assert run.num_preemptions >= 3
    assert run.violations == []


def test_prefix_caching_with_a_window(mistral) -> None:  # type: ignore[no-untyped-def]
    """The same prompts twice with prefix caching: released blocks stay cached (evictable),
    later requests reuse what the index still chains from the first block, tokens unchanged."""
    window, path, want = mistral
    prompts = _prompts()
    run = run_windowed(CpuPlatform(), path, prompts + prompts, NEW_TOKENS,
                       enable_prefix_caching=True, num_kv_blocks=24)
    assert run.tokens == want + want
    assert run.violations == []


def test_long_decode_holds_a_constant_number_of_blocks(tmp_path: Path) -> None:
    """One sequence decoding 120 tokens past its prompt holds at most window/block + 1 blocks
    in every decode step, in a pool smaller than the sequence."""
    path = save_tiny_family(tmp_path, "mistral", sliding_window=5)
    prompt = [_prompts()[0]]
    want, _ = hf_greedy(path, prompt, 120)
    run = run_windowed(CpuPlatform(), path, prompt, 120, num_kv_blocks=33)
    assert run.tokens == want
    assert run.violations == []
    assert run.max_held_blocks <= window_block_bound(5, BS, 16)
    assert -(-(21 + 120) // BS) > 33  # the whole sequence would not fit the pool


def test_mixed_global_and_local_layers_keep_every_block(tmp_path: Path) -> None:
    """Gemma 2 alternates local and global layers: the global ones read every block, so none
    is released (and Mistral without a window frees nothing either)."""
    for family, extra in (("gemma2", {}), ("mistral", {"sliding_window": None})):
        path = save_tiny_family(tmp_path / family, family, **extra)
        engine = greedy_engine(CpuPlatform(), path)
        assert engine.scheduler.block_manager.kv_window is None, family
        engine.shutdown()


class _KeepsBlocks(CpuPlatform):
    @classmethod
    def capabilities(cls) -> Capabilities:
        from dataclasses import replace

        return replace(super().capabilities(), skips_out_of_window_blocks=False)


def test_a_backend_that_reads_the_whole_table_keeps_every_block(tmp_path: Path) -> None:
    path = save_tiny_family(tmp_path, "mistral", sliding_window=3)
    engine = greedy_engine(_KeepsBlocks(), path)
    assert engine.scheduler.block_manager.kv_window is None
    engine.shutdown()


# -- the block manager on its own ----------------------------------------------------------


def _bm(num_blocks: int = 16, window: int | None = 6, caching: bool = False) -> BlockManager:
    pool = TorchKVBackend(KVCacheSpec(num_layers=0, num_kv_heads=1, head_dim=1, block_size=BS,
                                      dtype=torch.float16), num_blocks, torch.device("cpu"))
    return BlockManager(pool, BS, enable_caching=caching, kv_window=window)


def _computed(bm: BlockManager, rid: str, tokens: list[int], n: int) -> SequenceState:
    seq = SequenceState(rid, tokens, SamplingParams(max_tokens=1))
    bm.acquire_cached_prefix(seq)
    bm.allocate(seq, n - seq.num_computed_tokens)
    seq.num_computed_tokens = n
    bm.register_computed_blocks(seq)
    return seq


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_window_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="kv_window"):
        _bm(window=bad)  # type: ignore[arg-type]


def test_release_frees_only_blocks_before_the_window() -> None:
    bm = _bm(window=6)
    seq = _computed(bm, "a", list(range(30)), 21)  # 6 blocks, next query at 21 reads 16..
    assert bm.first_window_block(21) == 4
    assert bm.release_out_of_window(seq) == 4
    assert seq.block_table[:4] == [NO_BLOCK] * 4 and NO_BLOCK not in seq.block_table[4:]
    assert bm.num_free_blocks == 16 - 2 and bm.release_out_of_window(seq) == 0
    assert bm.stats().num_allocated_slots == 2 * BS
    bm.free(seq)
    assert bm.num_free_blocks == 16 and seq.num_released_blocks == 0


def test_window_of_one_token_and_no_window() -> None:
    bm = _bm(window=1)
    seq = _computed(bm, "a", list(range(12)), 9)
    assert bm.release_out_of_window(seq) == 2  # the query at 9 reads only itself (block 2)
    keep = _bm(window=None)
    seq = _computed(keep, "b", list(range(12)), 9)
    assert keep.release_out_of_window(seq) == 0 and keep.first_window_block(9) == 0


def test_released_cached_block_stays_indexed_until_evicted() -> None:
    """A block the index holds is not handed out when its sequence drops it: it becomes
    evictable, and leaves the pool only through eviction (which unindexes it first)."""
    bm = _bm(num_blocks=8, window=3, caching=True)
    a = _computed(bm, "a", list(range(20)), 17)
    first = a.block_table[0]
    assert bm.release_out_of_window(a) == 3
    assert bm.num_cached_blocks == 3 and bm.index.node_of(first) is not None
    # Everything left in the backend plus the evictable blocks must be taken before `first`.
    b = SequenceState("b", list(range(100, 120)), SamplingParams())
    bm.allocate(b, bm.kv.num_free_blocks * BS)
    assert first not in b.block_table and bm.index.node_of(first) is not None
    c = SequenceState("c", list(range(200, 204)), SamplingParams())
    bm.allocate(c, 4)  # evicts `first`'s chain: unindexed before it is reused
    assert bm.num_evicted_blocks >= 1 and bm.index.node_of(c.block_table[0]) is None


def test_evicting_a_released_head_keeps_the_chain_below_it() -> None:
    """Evicting a windowed sequence's released head blocks frees their KV but leaves hollow
    nodes on the path: a new request with the same prompt still reaches the blocks in its
    window (held by the first sequence) and reuses them; once those are gone too, the hollow
    path is pruned and nothing is left in the index."""
    bm = _bm(num_blocks=16, window=3, caching=True)
    tokens = list(range(24))
    a = _computed(bm, "a", tokens, 21)  # blocks 0..4 full and indexed, 5 partly filled
    assert bm.release_out_of_window(a) == 4 and bm.num_cached_blocks == 4
    assert bm.reset_prefix_cache() == 4  # the released blocks 0..3: hollowed, KV freed
    assert bm.kv.num_free_blocks == 16 - 2 and len(bm.index) == 5
    b = SequenceState("b", tokens, SamplingParams())
    assert bm.acquire_cached_prefix(b) == 20  # reads from block 4 (key 18) on: held by a
    assert b.block_table[:4] == [NO_BLOCK] * 4 and b.block_table[4] == a.block_table[4]
    bm.free(b)
    bm.free(a)
    assert bm.reset_prefix_cache() == 1 and len(bm.index) == 0 and bm.index.num_roots == 0
    assert bm.kv.num_free_blocks == 16


def test_a_match_stops_where_its_window_would_read_a_hollow_block() -> None:
    bm = _bm(num_blocks=16, window=6, caching=True)
    tokens = list(range(40))
    a = _computed(bm, "a", tokens, 33)  # 8 full blocks
    assert bm.release_out_of_window(a) == 7  # blocks 0..6, oldest first in line
    assert bm._evict(3) == 3  # 0, 1, 2 hollowed
    bm.free(a)

    def hit(n: int, rid: str) -> int:
        seq = SequenceState(rid, tokens[:n], SamplingParams())
        got = bm.acquire_cached_prefix(seq)
        bm.release_cached_prefix(seq)
        return got

    assert hit(30, "c") == 28  # 7 blocks; reads from block 5
    assert hit(22, "d") == 20  # 5 blocks; reads from block 3
    assert hit(18, "e") == 0  # 4 blocks would read block 2; 3, 2, 1 read hollow ones too
    # Recomputing the hollow blocks fills the nodes again.
    f = _computed(bm, "f", tokens[:14], 13)
    assert f.num_computed_tokens == 13 and bm.index.node_of(f.block_table[2]) is not None
    bm.free(f)
    assert hit(18, "g") == 16 and bm.num_held_blocks == 0


def test_cache_hit_drops_the_part_before_the_window() -> None:
    bm = _bm(num_blocks=16, window=3, caching=True)
    tokens = list(range(22))
    a = _computed(bm, "a", tokens, 20)
    bm.free(a)
    b = SequenceState("b", tokens, SamplingParams())
    assert bm.acquire_cached_prefix(b) == 20
    assert b.num_released_blocks == bm.first_window_block(20) == 4
    assert b.block_table[:4] == [NO_BLOCK] * 4 and len(b.block_hashes) == 5


def test_fork_shares_only_blocks_in_the_childs_window() -> None:
    bm = _bm(num_blocks=32, window=6)
    tokens = list(range(23))
    parent = _computed(bm, "p", tokens, 23)
    child = SequenceState("p/1", tokens, SamplingParams())
    bm.fork(parent, child)  # child recomputes from 20, reads from 15 (block 3)
    assert child.num_computed_tokens == 20 and child.num_released_blocks == 3
    assert child.block_table[3:] == parent.block_table[3:5]
    assert all(bm.ref_counts[b] == 2 for b in child.block_table[3:])
    # A parent that already dropped blocks the child needs shares nothing.
    bm.free(child)
    parent.num_computed_tokens = 23
    bm.release_out_of_window(parent)  # drops blocks 0..3 (reads from 18)
    late = SequenceState("p/2", tokens, SamplingParams())
    bm.fork(parent, late)
    assert late.block_table == [] and late.num_computed_tokens == 0


# -- admission: a windowed prompt needs its window and one chunk, not the whole pool ---------


def _long_prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def mistral5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_family(tmp_path_factory.mktemp("mistral-w5"), "mistral", sliding_window=5)


def test_a_prompt_longer_than_the_pool_matches_transformers(mistral5: Path) -> None:
    """Window 5, 16-token chunks, 4-token blocks: at most 6 blocks held; a pool of 8 blocks
    (32 tokens) runs a 61-token prompt."""
    prompt = _long_prompts(61)
    want, _ = hf_greedy(mistral5, prompt, 12)
    run = run_windowed(CpuPlatform(), mistral5, prompt, 12, num_kv_blocks=8)
    assert run.tokens == want
    assert run.violations == [] and run.max_held_blocks <= 6
    assert -(-61 // BS) > 8


def test_several_prompts_longer_than_the_pool_all_finish(mistral5: Path) -> None:
    """Three such prompts at once compete for 8 blocks (newer ones wait for room), also while
    sequences that released blocks are preempted and recompute their whole (longer than the
    pool) prompt: every one finishes with transformers' tokens."""
    prompts = _long_prompts(61, 45, 70)
    want, _ = hf_greedy(mistral5, prompts, 10)
    for caching, preempt in ((False, None), (False, 6), (True, 6)):
        run = run_windowed(CpuPlatform(), mistral5, prompts, 10, num_kv_blocks=8,
                           enable_prefix_caching=caching, preempt_every=preempt)
        assert run.tokens == want, (caching, preempt)
        assert run.violations == []
        assert (run.num_preemptions >= 2) == bool(preempt)


def test_window_plus_chunk_larger_than_the_pool_is_refused(mistral5: Path) -> None:
    engine = greedy_engine(CpuPlatform(), mistral5, num_kv_blocks=5)
    try:
        with pytest.raises(ValueError, match=r"needs 6 KV blocks for its 5-token sliding window "
                                             r"plus a 16-token prefill chunk.*num_kv_blocks"):
            engine.add_request(_long_prompts(40)[0])
        # A prompt within the pool is still taken (and served) by the same engine.
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        engine.add_request(_long_prompts(19)[0], params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()


def test_without_a_window_the_whole_prompt_must_fit(tmp_path: Path) -> None:
    path = save_tiny_family(tmp_path, "mistral", sliding_window=None)
    engine = greedy_engine(CpuPlatform(), path, num_kv_blocks=8)
    try:
        with pytest.raises(ValueError, match=r"needs 16 KV blocks for its 61 tokens.*32 tokens "
                                             r"of KV capacity.*max_model_len"):
            engine.add_request(_long_prompts(61)[0])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("window", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_max_blocks_held_is_the_worst_step(window: int, chunk: int) -> None:
    """Against every step a sequence can take: from any position, up to ``chunk`` tokens."""
    bm = _bm(window=window)
    for total in (1, 5, 8, 13, 40):
        worst = 0
        for c in range(total):
            for n in range(1, min(chunk, total - c) + 1):
                first = max(0, c - window + 1) // BS
                worst = max(worst, (c + n - 1) // BS - first + 1)
        assert bm.max_blocks_held(total, chunk) == worst, (total, chunk, window)
    assert _bm(window=None).max_blocks_held(13, chunk) == 4
    with pytest.raises(ValueError, match="num_tokens and chunk"):
        bm.max_blocks_held(0, chunk)


def test_disaggregated_pools_still_need_the_whole_prompt() -> None:
    """Across a prefill/decode pair nothing is released out of the window (the prompt moves
    whole), so there the whole prompt must fit; the single-engine scheduler takes it."""
    from sagellm.distributed.disagg import DisaggScheduler
    from sagellm.engine.scheduler import Scheduler

    long = SequenceState("long", list(range(61)), SamplingParams())
    pair = DisaggScheduler(_bm(num_blocks=8, window=5), _bm(num_blocks=8, window=None), 4, 32, 16)
    with pytest.raises(ValueError, match="needs 16 KV blocks for its 61 tokens; the decode pool"):
        pair.add(long)
    single = Scheduler(_bm(num_blocks=8, window=5), 4, 32, 16)
    single.add(long)
    assert single.num_waiting == 1


def test_a_long_prompt_repeated_reuses_its_window_despite_its_own_evictions(mistral5: Path
                                                                            ) -> None:
    """A 61-token prompt in a 12-block pool fills 16 blocks over its run, so its own later
    blocks evict its released first ones. Those used to take the whole chain with them (the
    repeat found nothing); now they leave a hollow path and the repeat reuses every whole
    block of its prompt (the KV of its window), with transformers' tokens both times."""
    prompt = _long_prompts(61)
    want, _ = hf_greedy(mistral5, prompt, 6)
    for policy in ("lru", "lfu", "s3fifo"):
        engine = greedy_engine(CpuPlatform(), mistral5, num_kv_blocks=12,
                               enable_prefix_caching=True, kv_eviction=policy)
        try:
            bm = engine.scheduler.block_manager
            assert run_greedy(engine, prompt, 6)[1] == want
            assert bm.num_evicted_blocks > 0 and bm.num_cache_hits == 0
            assert run_greedy(engine, prompt, 6)[1] == want
            assert bm.num_cache_hits == (61 - 1) // BS * BS, policy  # every whole block
            assert bm.num_held_blocks == 0
        finally:
            engine.shutdown()


def test_a_preempted_sequence_longer_than_its_prompt_is_readmitted_in_shorter_chunks() -> None:
    """Pool of 3 blocks, window 2, 16-token chunks: a 12-token prompt fits (3 blocks) and its
    decodes hold 2, but after 10 generated tokens a recompute's first 16-token chunk would
    need 4 blocks. Alone in the engine it is admitted with what fits and finishes the
    recompute holding at most 3 blocks."""
    from sagellm.engine.scheduler import Scheduler

    bm = _bm(num_blocks=3, window=2)
    sch = Scheduler(bm, 4, 32, 16)
    seq = SequenceState("s", list(range(12)), SamplingParams(max_tokens=20))
    sch.add(seq)
    for tok in range(10):
        seq.append_token(100 + tok)  # as if generated, then preempted (nothing computed)
    while seq.is_prefill:
        plan = sch.schedule()
        assert [op.seq for op in plan.prefills] == [seq]
        assert sum(1 for b in seq.block_table if b != NO_BLOCK) <= 3
        sch.commit(plan)
    assert seq.num_computed_tokens == 22 and sch.num_steps >= 2
