"""The ``prefix_chat`` workload: multi-turn chat over shared system prompts, for the prefix cache.

``num_conversations`` conversations, ``concurrency`` of them at a time. Each starts with one of
``num_system_prompts`` system prompts, drawn Zipf-distributed (exponent ``zipf_s``: a few are
popular, most rare), and runs ``turns`` turns: a user message of U[``user_min``, ``user_max``]
random tokens, then the model's greedy reply of ``reply_tokens`` tokens, both kept in the
conversation, so each turn's prompt is the last one plus two messages. A finished turn is
followed at once by the next (or, after the last, by a new conversation). Every random draw comes
from ``numpy.random.default_rng(seed)``, so every policy sees the same requests in the same order
as long as the engine finishes them in the same order.

Reported: the prefix-cache hit rate over the run (prompt tokens found cached over those looked
up), time to first token (from submission), output and total tokens per second, evictions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from sagellm.engine.llm_engine import LLMEngine
from sagellm.sampling_params import SamplingParams


@dataclass(frozen=True)
class PrefixChatSpec:
    num_system_prompts: int = 16
    system_len: int = 96
    zipf_s: float = 1.1
    num_conversations: int = 48
    concurrency: int = 6
    turns: int = 4
    user_min: int = 8
    user_max: int = 40
    reply_tokens: int = 12
    seed: int = 7


@dataclass
class _Conversation:
    tokens: list[int]
    turns_left: int


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else 0.0


def prefix_chat(engine: LLMEngine, spec: PrefixChatSpec = PrefixChatSpec()) -> dict[str, object]:
    rng = np.random.default_rng(spec.seed)
    hi = min(engine.vocab_size, 49000)
    systems = [rng.integers(2, hi, spec.system_len).tolist() for _ in range(spec.num_system_prompts)]
    weights = 1.0 / np.arange(1, spec.num_system_prompts + 1) ** spec.zipf_s
    weights /= weights.sum()
    starts = rng.choice(spec.num_system_prompts, size=spec.num_conversations, p=weights).tolist()
    params = SamplingParams(max_tokens=spec.reply_tokens, temperature=0.0, ignore_eos=True)
    bm = engine.block_manager
    q0, h0, e0 = bm.num_cache_queries, bm.num_cache_hits, bm.num_evicted_blocks

    def user_turn(conv: _Conversation) -> list[int]:
        conv.tokens += rng.integers(2, hi, int(rng.integers(spec.user_min, spec.user_max + 1))).tolist()
        conv.turns_left -= 1
        return list(conv.tokens)

    active: dict[str, _Conversation] = {}
    next_conv = 0
    ttft_ms: list[float] = []
    prompt_tokens = output_tokens = 0

    def submit(conv: _Conversation) -> None:
        nonlocal prompt_tokens
        prompt = user_turn(conv)
        prompt_tokens += len(prompt)
        active[engine.add_request(prompt, params)] = conv

    t0 = time.perf_counter()
    while next_conv < spec.num_conversations and len(active) < spec.concurrency:
        submit(_Conversation(list(systems[starts[next_conv]]), spec.turns))
        next_conv += 1
    while active:
        for out in engine.step():
            if not out.finished:
                continue
            conv = active.pop(out.request_id)
            m = out.metrics
            if m is not None and m.first_token_time is not None:
                ttft_ms.append((m.first_token_time - m.arrival_time) * 1e3)
            reply = out.token_ids
            output_tokens += len(reply)
            conv.tokens += list(reply)
            if conv.turns_left:
                submit(conv)
            elif next_conv < spec.num_conversations:
                submit(_Conversation(list(systems[starts[next_conv]]), spec.turns))
                next_conv += 1
    secs = time.perf_counter() - t0
    queries, hits = bm.num_cache_queries - q0, bm.num_cache_hits - h0
    return {
        "spec": asdict(spec),
        "policy": bm.eviction.__class__.__name__,
        "num_kv_blocks": bm.num_blocks,
        "block_size": bm.block_size,
        "requests": len(ttft_ms),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "hit_rate": hits / queries if queries else 0.0,
        "hit_tokens": hits,
        "partial_hit_tokens_recomputed": bm.num_partial_hit_tokens,
        "evicted_blocks": bm.num_evicted_blocks - e0,
        "ttft_ms_p50": statistics.median(ttft_ms) if ttft_ms else 0.0,
        "ttft_ms_p90": _percentile(ttft_ms, 90),
        "ttft_ms_mean": statistics.fmean(ttft_ms) if ttft_ms else 0.0,
        "s": secs,
        "out_tok_s": output_tokens / secs,
        "total_tok_s": (prompt_tokens + output_tokens) / secs,
    }


def format_table(rows: dict[str, dict[str, object]]) -> str:
    """One line per policy: hit rate, TTFT, throughput."""
    lines = [f"{'policy':8s} {'hit rate':>8s} {'TTFT p50':>9s} {'TTFT p90':>9s} {'out tok/s':>9s} "
             f"{'all tok/s':>9s} {'evicted':>8s}"]
    for name, r in rows.items():
        lines.append(f"{name:8s} {r['hit_rate']:8.1%} {r['ttft_ms_p50']:7.1f}ms {r['ttft_ms_p90']:7.1f}ms "
                     f"{r['out_tok_s']:9.1f} {r['total_tok_s']:9.1f} {r['evicted_blocks']:8d}")
    return "\n".join(lines)
