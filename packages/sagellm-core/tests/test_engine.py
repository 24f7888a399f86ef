"""Engine behaviour: batching invariance, KV accounting, preemption, stop conditions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from sagellm.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), num_kv_blocks=400)


def test_same_tokens_alone_and_in_a_batch(prompts, llama: LLM) -> None:
    prompts = prompts(9, 320, lo=2, hi=90, seed=3)
    batched = llama.generate(prompts, GREEDY, use_tqdm=False)
    for p, b in zip(prompts, batched):
        alone = llama.generate([p], GREEDY, use_tqdm=False)[0]
        assert alone.token_ids == b.token_ids
        assert len(b.token_ids) == 20


def test_hundred_requests_return_every_block_and_fragmentation_is_low(prompts, llama: LLM) -> None:
    eng = llama.engine
    free_before = eng.block_manager.num_free_blocks
    prompts = prompts(100, 320, lo=20, hi=300, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=8 + (i * 37) % 120, ignore_eos=True)
              for i in range(100)]
    for p, sp in zip(prompts, params):
        eng.add_request(p, sp)
    fragmentation = []
    finished = 0
    while eng.has_unfinished_requests():
        finished += sum(o.finished for o in eng.step())
        stats = eng.get_stats()
        if stats.num_running:
            fragmentation.append(stats.kv_fragmentation)
    assert finished == 100
    assert eng.block_manager.ref_counts == {}
    assert eng.block_manager.num_free_blocks == free_before == eng.kv.num_blocks
    eng.block_manager.reset_prefix_cache()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    mean_frag = sum(fragmentation) / len(fragmentation)
    print(f"KV fragmentation over {len(fragmentation)} steps: mean {mean_frag:.2%}, "
          f"max {max(fragmentation):.2%}")
    assert mean_frag < 0.10


def test_small_kv_pool_preempts_and_still_finishes_everything(prompts, tiny_llama_dir: Path, llama: LLM) -> None:
    prompts = prompts(12, 320, lo=30, hi=60, seed=5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in llama.generate(prompts, params, use_tqdm=False)]
    small = LLM(model=str(tiny_llama_dir), num_kv_blocks=24)  # 384 slots for ~12 x 90 tokens
    outs = small.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert small.engine.get_stats().num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) == small.engine.get_stats().num_preemptions
    assert small.engine.block_manager.num_free_blocks == 24


def test_long_prompt_is_prefilled_in_chunks(prompts, tiny_llama_dir: Path, llama: LLM,
                                            caplog: pytest.LogCaptureFixture) -> None:
    prompt = prompts(1, 320, lo=200, hi=201, seed=9)[0]
    expected = llama.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    chunked = LLM(model=str(tiny_llama_dir), num_kv_blocks=100, max_num_batched_tokens=64,
                  max_prefill_tokens=48)
    with caplog.at_level(logging.DEBUG, logger="sagellm.scheduler"):
        out = chunked.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "sagellm.scheduler"]
    # 200 tokens in chunks of at most 48: five prefill steps, then decodes.
    prefill_lines = [m for m in lines if "prefill 0 tok" not in m]
    assert len(prefill_lines) == 5
    assert "req-0[0:48]" in prefill_lines[0] and "req-0[192:200]" in prefill_lines[4]
    assert all("decode" in m for m in lines)


def test_stop_token_ids_max_tokens_and_eos(prompts, llama: LLM) -> None:
    prompt = prompts(1, 320, seed=21)[0]
    free = llama.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = llama.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                  stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    short = llama.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert short.finish_reason in ("length", "stop") and len(short.token_ids) <= 3


def test_min_tokens_suppresses_stop_tokens(prompts, llama: LLM) -> None:
    prompt = prompts(1, 320, seed=21)[0]
    free = llama.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    out = llama.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                                  stop_token_ids=[free[0]], ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(out.token_ids) == 10 and free[0] not in out.token_ids[:9]


def test_seeded_sampling_is_reproducible_and_batch_independent(prompts, llama: LLM) -> None:
    prompts = prompts(5, 320, seed=2)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=16, ignore_eos=True)
    alone = llama.generate([prompts[0]], sp, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    batch = llama.generate(prompts, [sp] + [others] * 4, use_tqdm=False)
    assert batch[0].token_ids == alone
    other_seed = llama.generate([prompts[0]], sp.model_copy(update={"seed": 7}), use_tqdm=False)[0]
    assert other_seed.token_ids != alone


def test_abort_frees_blocks(prompts, llama: LLM) -> None:
    eng: LLMEngine = llama.engine
    rid = eng.add_request(prompts(1, 320, lo=50, hi=51)[0], GREEDY)
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.kv.num_blocks
    assert eng.abort_request(rid)
    assert not eng.abort_request(rid)
    assert eng.block_manager.num_free_blocks == eng.kv.num_blocks
    assert not eng.has_unfinished_requests()


def test_bad_prompts_are_rejected_clearly(llama: LLM) -> None:
    eng = llama.engine
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 2, 100000])
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="context"):
        eng.add_request([5] * 600)
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.add_request("text for a model without a tokenizer")
    assert not eng.has_unfinished_requests()


def test_generation_stops_at_the_context_limit(tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), max_model_len=40, num_kv_blocks=20)
    out = llm.generate([[3] * 30], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_prefix_cache_reuses_blocks_and_keeps_outputs(prompts, tiny_llama_dir: Path) -> None:
    shared = prompts(1, 320, lo=70, hi=71, seed=40)[0]
    tails = prompts(4, 320, lo=3, hi=20, seed=41)
    batch = [shared + t for t in tails]
    plain = LLM(model=str(tiny_llama_dir), num_kv_blocks=200, enable_prefix_caching=False)
    cached = LLM(model=str(tiny_llama_dir), num_kv_blocks=200)
    expected = [o.token_ids for o in plain.generate(batch, GREEDY, use_tqdm=False)]
    first = cached.generate([batch[0]], GREEDY, use_tqdm=False)[0]
    bm = cached.engine.block_manager
    assert first.token_ids == expected[0] and bm.num_cache_hits == 0
    assert bm.num_cached_blocks > 0 and cached.engine.kv.num_free_blocks < 200
    outs = cached.generate(batch[1:], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected[1:]
    assert bm.num_cache_hits >= 3 * 64  # four full 16-token blocks of the shared prefix, 3 times
    again = cached.generate([batch[0]], GREEDY, use_tqdm=False)[0]
    assert again.token_ids == expected[0]
    assert bm.num_free_blocks == 200 and bm.ref_counts == {}
    assert bm.reset_prefix_cache() > 0 and cached.engine.kv.num_free_blocks == 200


def test_prefix_cache_evicts_under_pressure(prompts, tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=12)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for p in prompts(6, 320, lo=90, hi=120, seed=50):  # each needs 6-8 of the 12 blocks
        out = llm.generate([p], sp, use_tqdm=False)[0]
        assert len(out.token_ids) == 8
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == 12 and bm.num_cached_blocks <= 12
