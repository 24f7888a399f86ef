"""The benchmark workloads, each a function of a warm engine returning a JSON-ready dict.

Prompts are random token ids: ``numpy.random.default_rng(seed).integers(100, 49000, size=L)``, a
fresh seed per repetition so no prefix cache can help. Every request is greedy and generates
exactly ``max_tokens`` (``ignore_eos``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from sagellm.engine.llm_engine import LLMEngine
from sagellm.sampling_params import SamplingParams


def random_prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 49000, size=length).tolist()


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_requests(engine: LLMEngine, prompts: Sequence[list[int]], max_tokens: Sequence[int],
                 on_step=None) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Submit all prompts at once, step until done; returns (seconds, output tokens)."""
    t0 = time.perf_counter()
    for p, m in zip(prompts, max_tokens):
        engine.add_request(p, params(m))
    n = 0
    while engine.has_unfinished_requests():
        n += len(engine.step())
        if on_step is not None:
            on_step(engine)
    return time.perf_counter() - t0, n


def e2e_ms(engine: LLMEngine, prompt: list[int], max_tokens: int) -> float:
    secs, n = run_requests(engine, [prompt], [max_tokens])
    assert n == max_tokens, f"expected {max_tokens} tokens, got {n}"
    return secs * 1e3


def warm_up(engine: LLMEngine) -> float:
    """One small request (engines are warm in every workload). Returns its seconds."""
    secs, _ = run_requests(engine, [random_prompt(999, 16)], [8])
    return secs


def ttft_512(engine: LLMEngine) -> dict[str, object]:
    ms = [e2e_ms(engine, random_prompt(1000 + i, 512), 1) for i in range(10)]
    return {"prompt": 512, "ms_median": statistics.median(ms), "ms_all": ms}


def tpot_512_256(engine: LLMEngine) -> dict[str, object]:
    long = [e2e_ms(engine, random_prompt(2000 + i, 512), 256) for i in range(3)]
    short = [e2e_ms(engine, random_prompt(2010 + i, 512), 1) for i in range(3)]
    ms = (statistics.median(long) - statistics.median(short)) / 255
    return {"prompt": 512, "output": 256, "ms_median": ms,
            "e2e_ms_median": statistics.median(long), "e2e_ms_all": long, "ttft_ms_all": short}


def batch_512_256(engine: LLMEngine, num_requests: int, seed0: int) -> dict[str, object]:
    prompts = [random_prompt(seed0 + i, 512) for i in range(num_requests)]
    secs, n = run_requests(engine, prompts, [256] * num_requests)
    assert n == 256 * num_requests
    return {"requests": num_requests, "prompt": 512, "output": 256, "s": secs,
            "out_tok_s": n / secs}


def nano256_random(engine: LLMEngine) -> dict[str, object]:
    rng = np.random.default_rng(5000)
    prompt_lens = rng.integers(100, 1025, 256)
    output_lens = np.random.default_rng(5007).integers(100, 1025, 256)
    prompts = [rng.integers(100, 49000, size=int(n)).tolist() for n in prompt_lens]
    secs, n = run_requests(engine, prompts, [int(m) for m in output_lens])
    assert n == int(output_lens.sum())
    return {"requests": 256, "prompt": "U[100,1024]", "output": "U[100,1024]", "s": secs,
            "out_tok_s": n / secs, "output_tokens": n}


def kv_fragmentation(engine: LLMEngine) -> dict[str, object]:
    """100 requests of mixed lengths through the paged pool; internal fragmentation per step.

    Prompt lengths U[16, 2048], outputs U[16, 512] (seed 6000). Reported: wasted slots in
    allocated blocks over allocated slots, summed over all steps (time-weighted), and the worst
    step.
    """
    rng = np.random.default_rng(6000)
    prompt_lens = rng.integers(16, 2049, 100)
    output_lens = rng.integers(16, 513, 100)
    prompts = [rng.integers(100, 49000, size=int(n)).tolist() for n in prompt_lens]
    wasted = allocated = 0
    worst = 0.0

    def sample(e: LLMEngine) -> None:
        nonlocal wasted, allocated, worst
        b = e.block_manager.stats()
        wasted += b.num_wasted_slots
        allocated += b.num_allocated_slots
        worst = max(worst, b.fragmentation)

    secs, n = run_requests(engine, prompts, [int(m) for m in output_lens], on_step=sample)
    return {"requests": 100, "block_size": engine.config.block_size,
            "fragmentation": wasted / allocated if allocated else 0.0,
            "fragmentation_worst_step": worst, "s": secs, "out_tok_s": n / secs}


def kv_capacity(engine: LLMEngine) -> dict[str, object]:
    blocks = engine.kv.num_blocks
    spec = engine.kv_spec
    return {"num_blocks": blocks, "block_size": spec.block_size,
            "tokens": blocks * spec.block_size,
            "gib": blocks * spec.bytes_per_block / 2**30,
            "gpu_memory_utilization": engine.config.gpu_memory_utilization}
