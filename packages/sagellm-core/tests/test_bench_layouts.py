"""``sagellm bench`` at TP=2 (gloo) and with a disaggregated prefill worker, on the CPU.

A tiny config-only Llama (random weights, like every bench model) with the bench's vocabulary
range (token ids up to 49000): one quick offline workload per layout and prefix_chat on a small
spec, to show every workload path builds, drives and shuts down a multi-rank engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from sagellm.bench import main as bench_main
from sagellm.bench.prefix_chat import PrefixChatSpec

SPEC = PrefixChatSpec(num_system_prompts=3, system_len=40, num_conversations=4, concurrency=2,
                      turns=2, user_min=4, user_max=10, reply_tokens=3)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("bench-tiny")
    LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=False).save_pretrained(d)
    return d


def _args(*argv: str) -> object:
    p = bench_main.argparse.ArgumentParser()
    bench_main.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "2"], ["--disaggregate-prefill"]],
                         ids=["tp2", "disagg"])
def test_offline_workload_runs_on_a_multi_rank_engine(bench_dir: Path, tmp_path: Path,
                                                      layout: list[str]) -> None:
    out = tmp_path / "bench.json"
    rc = bench_main.main(["--model", str(bench_dir), *layout, "--workloads", "ttft_512",
                          "--num-kv-blocks", "128", "--max-num-batched-tokens", "512",
                          "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    row = result["ttft_512"]
    assert len(row["ms_all"]) == 10 and row["ms_median"] > 0
    tp2 = layout[0] == "--tensor-parallel-size"
    assert result["layout"] == {"tensor_parallel_size": 2 if tp2 else 1,
                                "disaggregate_prefill": not tp2,
                                "ranks": result["layout"]["ranks"]}
    assert result["layout"]["ranks"].startswith("2 ranks on 1 host(s)")
    # The other rank really worked: all-reduces under TP, KV blocks moved when disaggregated.
    op = "all_reduce" if tp2 else "kv_transfer"
    assert result["comm"][op]["calls"] > 0 and result["comm"][op]["bytes"] > 0
    assert result["kv_capacity"]["num_blocks"] == 128
    assert not dist.is_initialized()  # the bench shut the engine's workers down


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "2"], ["--disaggregate-prefill"]],
                         ids=["tp2", "disagg"])
def test_prefix_chat_sweep_restarts_the_multi_rank_engine_per_policy(bench_dir: Path,
                                                                     layout: list[str]) -> None:
    args = _args("--model", str(bench_dir), *layout, "--kv-eviction", "lru,s3fifo",
                 "--num-kv-blocks", "24")
    result: dict[str, object] = {}
    rows = bench_main._prefix_sweep(args, result, SPEC)  # type: ignore[arg-type]
    assert list(rows) == ["lru", "s3fifo"]
    for policy, row in rows.items():
        assert row["requests"] == 8 and row["output_tokens"] == 8 * 3
        assert row["policy"] == {"lru": "LRUPolicy", "s3fifo": "S3FIFOPolicy"}[policy]
    assert rows["lru"]["prompt_tokens"] == rows["s3fifo"]["prompt_tokens"]
    if layout[0] == "--tensor-parallel-size":
        assert rows["lru"]["hit_rate"] > 0 and "note" not in rows["lru"]
    else:  # no prefix cache across the prefill/decode pair yet, and the row says so
        assert rows["lru"]["hit_rate"] == 0 and "prefill/decode pair" in rows["lru"]["note"]
    assert result["backend"] == "cpu"
    assert not dist.is_initialized()


@pytest.mark.parametrize(("argv", "field"), [
    (["--kv-eviction", "lru,mru"], "--kv-eviction"),
    (["--kv-eviction", ","], "--kv-eviction"),
    (["--workloads", "ttft_512,nope"], "--workloads"),
    (["--workloads", ","], "--workloads"),
    (["--threads", "0"], "--threads"),
])
def test_bad_bench_flags_are_refused_by_name(bench_dir: Path, tmp_path: Path, argv: list[str],
                                             field: str) -> None:
    with pytest.raises(ValueError, match=field):
        bench_main.main(["--model", str(bench_dir), "--out", str(tmp_path / "x.json"), *argv])


def test_bad_layouts_are_refused_before_any_worker_starts(bench_dir: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    base = ["--model", str(bench_dir), "--workloads", "ttft_512", "--out", str(tmp_path / "x.json")]
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        bench_main.main([*base, "--tensor-parallel-size", "0"])
    with pytest.raises(ValueError, match="cannot be combined"):
        bench_main.main([*base, "--tensor-parallel-size", "2", "--disaggregate-prefill"])
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size"):
        bench_main.main([*base, "--tensor-parallel-size", "3"])
    assert not dist.is_initialized()
