"""The prefix_chat bench workload: same requests under every policy, hits reported."""

from __future__ import annotations

from pathlib import Path

from sagellm.bench.prefix_chat import PrefixChatSpec, format_table, prefix_chat
from sagellm.engine.llm_engine import LLMEngine

SPEC = PrefixChatSpec(num_system_prompts=4, system_len=40, num_conversations=6, concurrency=3,
                      turns=2, user_min=4, user_max=10, reply_tokens=4)


def test_every_policy_sees_the_same_requests_and_the_cache_hits(tiny_llama_dir: Path) -> None:
    rows = {}
    for policy in ("lru", "s3fifo"):
        engine = LLMEngine(model=str(tiny_llama_dir), num_kv_blocks=16, kv_eviction=policy)
        rows[policy] = prefix_chat(engine, SPEC)
    lru, s3 = rows["lru"], rows["s3fifo"]
    assert lru["requests"] == s3["requests"] == 12
    assert lru["prompt_tokens"] == s3["prompt_tokens"] and lru["output_tokens"] == 12 * 4
    assert 0 < lru["hit_rate"] < 1 and lru["evicted_blocks"] > 0  # type: ignore[operator]
    assert lru["policy"] == "LRUPolicy" and s3["policy"] == "S3FIFOPolicy"
    table = format_table(rows)
    assert table.splitlines()[1].startswith("lru") and "%" in table
