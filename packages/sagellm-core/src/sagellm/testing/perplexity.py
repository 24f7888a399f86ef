"""Perplexity of a text under an engine's loaded model, teacher-forced through its own runner.

The text runs as one sequence prefilled in chunks of the engine's prefill budget, so every
layer, the paged KV cache and the chunked-prefill attention (later chunks attend to the cached
prefix) are the ones serving uses; only the logits of every position are kept instead of
the last one's.
"""

from __future__ import annotations

import math

import torch

from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.plan import PrefillOp, StepPlan
from sagellm.engine.sequence import SequenceState
from sagellm.sampling_params import SamplingParams


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[len, vocab]`` of every position of ``token_ids`` (row ``i`` predicts
    token ``i + 1``), on the host.

    Takes KV blocks from the engine's pool for the duration (the engine must be idle) and gives
    them back.
    """
    if not token_ids:
        raise ValueError("no tokens")
    runner = ModelRunner(engine.parts.runner_context())
    bs = engine.config.block_size
    blocks = engine.kv.allocate_blocks(-(-len(token_ids) // bs))
    chunk = engine.config.max_prefill_tokens or engine.config.max_num_batched_tokens
    seq = SequenceState("perplexity", token_ids, SamplingParams(max_tokens=1))
    seq.block_table = blocks
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            inp = runner.prepare(StepPlan(step_id=0, prefills=[PrefillOp(seq, start, end)]))
            hidden = runner.model(inp.input_ids, inp.positions,
                                  runner.forward_context(inp.attn_metadata))
            out.append(runner.compute_logits(hidden).cpu())
    finally:
        engine.kv.free_blocks(blocks)
    return torch.cat(out)


def token_logprobs(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """``log p(token_ids[i] | token_ids[:i])`` for ``i >= 1``, float32 ``[len - 1]``."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    logp = torch.log_softmax(prompt_logits(engine, token_ids)[:-1], dim=-1)
    return logp.gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


def perplexity(engine: LLMEngine, token_ids: list[int]) -> float:
    """``exp`` of the mean negative log-likelihood of ``token_ids[1:]``."""
    return math.exp(-float(token_logprobs(engine, token_ids).mean()))
