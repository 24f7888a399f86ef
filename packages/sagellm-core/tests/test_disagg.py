"""Prefill/decode disaggregation on the CPU: a prefill process and a decode process over gloo.

The output must equal the single engine's, the finished prompts' KV must cross through
``send_kv_blocks``/``recv_kv_blocks`` (and show in the bandwidth stats), and every block must be
back in its pool on both sides when the requests are done - counted by each side itself.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.distributed.disagg import DisaggRunner, DisaggScheduler
from sagellm.distributed.launcher import WorkerFailure

ENGINE = dict(max_num_batched_tokens=64, max_prefill_tokens=32)


def _prompts(n: int, seed: int, lo: int = 3, hi: int = 70) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, 320, (L,), generator=g).tolist() for L in lens]


def _params(n: int) -> list[SamplingParams]:
    out = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(n - 1)]
    return out + [SamplingParams(temperature=0.7, top_k=20, seed=11, max_tokens=9, ignore_eos=True)]


def _pools(llm: LLM) -> tuple[int, int, int]:
    """Blocks in use: decode pool, prefill pool as rank 0 books it, prefill pool as rank 1 counts."""
    eng = llm.engine
    runner = eng.runner
    assert isinstance(runner, DisaggRunner)
    held, total = runner.prefill_pool_usage()
    assert total == runner.prefill_pool.num_blocks
    return (eng.kv.num_blocks - eng.kv.num_free_blocks,
            runner.prefill_pool.num_blocks - runner.prefill_pool.num_free_blocks, held)


@pytest.fixture()
def disagg(tiny_llama_dir: Path) -> Iterator[LLM]:
    # One multi-rank engine per process (it owns torch.distributed's default group), so each
    # test starts its own; the forkserver makes that take about a second.
    llm = LLM(model=str(tiny_llama_dir), disaggregate_prefill=True, num_kv_blocks=96, **ENGINE)
    yield llm
    llm.engine.shutdown()


def test_disaggregated_output_equals_single_engine(tiny_llama_dir: Path, disagg: LLM) -> None:
    prompts = _prompts(7, seed=1)
    expected = LLM(model=str(tiny_llama_dir), num_kv_blocks=96, **ENGINE).generate(
        prompts, _params(7), use_tqdm=False)
    eng = disagg.engine
    assert isinstance(eng.scheduler, DisaggScheduler)
    got = disagg.generate(prompts, _params(7), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert _pools(disagg) == (0, 0, 0)

    # Every prompt's KV crossed once, in blocks, and the transfers were timed.
    bs, per_block = eng.config.block_size, eng.kv_spec.bytes_per_block
    want = sum(-(-len(p) // bs) for p in prompts) * per_block
    stats = eng.workers.comm.get_bandwidth_stats().as_dict()
    assert stats["recv_kv_blocks"]["bytes"] == want
    assert stats["kv_transfer"]["bytes"] == want and stats["kv_transfer"]["gbps"] > 0
    assert eng.runner.transfers.num_transfers == len(prompts)


def test_pools_stay_in_step_and_abort_frees_both_sides(disagg: LLM) -> None:
    eng = disagg.engine
    long_prompt = _prompts(1, seed=2, lo=100, hi=101)[0]  # 4 chunks of 32 on the prefill worker
    rid = eng.add_request(long_prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    other = eng.add_request(_prompts(1, seed=3)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
        decode_used, booked, held = _pools(disagg)
        assert booked == held > 0  # the prefill worker holds exactly what rank 0 booked
    assert rid in eng.scheduler.prefilling  # still prefilling, in chunks
    assert eng.abort_request(rid)
    assert eng.abort_request(other)
    assert _pools(disagg) == (0, 0, 0)


def test_decode_pool_preemption_recomputes_on_prefill_worker(tiny_llama_dir: Path) -> None:
    prompts = _prompts(4, seed=4, lo=20, hi=40)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small = dict(num_kv_blocks=8, **ENGINE)  # room for two of the four requests at a time
    expected = LLM(model=str(tiny_llama_dir), **small).generate(prompts, params, use_tqdm=False)
    llm = LLM(model=str(tiny_llama_dir), disaggregate_prefill=True, **small)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert llm.engine.scheduler.num_preemptions > 0
        assert _pools(llm) == (0, 0, 0)

        # A dead prefill worker stops the engine with a clear error instead of hanging.
        proc = llm.engine.workers.processes[1]
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"prefill worker rank 1 .*SIGKILL"):
            llm.generate(prompts[:2], params, use_tqdm=False)
        assert time.monotonic() - t0 < 10
    finally:
        llm.engine.shutdown()
