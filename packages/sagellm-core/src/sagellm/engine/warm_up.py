"""One eager step at start-up, shaped like the first busy step of online serving.

A backend whose kernels compile on first use would otherwise compile, inside some user's
request, the variants that neither the memory profile (one prompt alone) nor the CUDA graphs
(decodes alone, one whole prompt) ever launched: several prompts in one step, a chunk over
cached context, decodes riding along with prefills, temperature sampling and the logprobs op
over several rows. Triton, for one, specializes a launch on its integer arguments (equal to 1,
divisible by 16), so the first step with three prompts is a new kernel. On an H200 the first
``serve_c16`` run after start-up had a TTFT p90 of 493 ms against about 90 ms in the runs
after it: its sixteen prompts arrive together and share one such step.

:func:`warm_up_step` runs one step with all of those at once on blocks of the still empty KV
pool, taken from the pool and given back: nothing is committed, and no scheduler, prefix cache
or request sees it. The runner calls it before it captures graphs.
"""

from __future__ import annotations

import logging
import time

from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.plan import DecodeOp, PrefillOp, StepPlan
from sagellm.engine.sequence import SequenceState
from sagellm.sampling_params import SamplingParams

logger = logging.getLogger("sagellm.engine.warm_up")

#: The step's prefills as ``(prompt length, first token computed)`` (start > 0: a chunk over
#: context already in the cache) and its decodes as sequence lengths. Lengths are neither 1
#: nor multiples of 16, and there are three of each kind.
PREFILLS = ((37, 0), (70, 32), (19, 0))
DECODES = (25, 40, 9)

_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
#: Per sequence (prefills, then decodes). Only the whole prompts sample with a temperature or
#: ask for logprobs: the other rows attend over cache slots nothing wrote, whose values may
#: not be finite, and their greedy argmax does not care.
PARAMS = (
    SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=20, seed=0, logprobs=2),
    _GREEDY,
    SamplingParams(max_tokens=1, temperature=0.0, logprobs=2),
    _GREEDY, _GREEDY, _GREEDY,
)


def blocks_needed(block_size: int) -> int:
    return sum(-(-n // block_size) for n, _ in PREFILLS) + sum(-(-n // block_size)
                                                             for n in DECODES)


def warm_up_step(runner: ModelRunner) -> int | None:
    """Run the warm-up step eagerly (core's :meth:`ModelRunner.execute`, whatever ``runner``'s
    own ``execute`` does); returns how many tokens it sampled, or ``None`` (nothing run) when
    the pool has fewer free blocks than it needs or its longest sequence is past
    ``max_model_len``."""
    bs, kv = runner.block_size, runner.kv
    need = blocks_needed(bs)
    longest = max(max(n for n, _ in PREFILLS), max(DECODES))
    if kv.num_free_blocks < need or longest > runner.max_model_len:
        return None
    t0 = time.perf_counter()
    blocks = kv.allocate_blocks(need)
    try:
        taken = iter(blocks)
        seqs: list[SequenceState] = []
        lengths = [n for n, _ in PREFILLS] + list(DECODES)
        for i, n in enumerate(lengths):
            seq = SequenceState(f"warm-up-{i}", [1 + (7 * j + i) % 97 for j in range(n)],
                                PARAMS[i])
            seq.block_table = [next(taken) for _ in range(-(-n // bs))]
            seqs.append(seq)
        plan = StepPlan(
            step_id=0,
            prefills=[PrefillOp(s, start, n) for s, (n, start) in zip(seqs, PREFILLS)],
            decodes=[DecodeOp(s) for s in seqs[len(PREFILLS):]])
        tokens = ModelRunner.execute(runner, plan)
    finally:
        kv.free_blocks(blocks)
    logger.info("warm-up step (%d prompts, %d decodes) in %.2f s", len(PREFILLS), len(DECODES),
                time.perf_counter() - t0)
    return len(tokens)
