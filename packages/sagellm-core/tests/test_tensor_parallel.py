"""Tensor parallelism on the CPU: two gloo processes give the same tokens as one process.

Weights are saved to disk once, so both engines load the very same numbers (the dummy loader
initialises each rank's shard on its own, which is not TP-invariant).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.distributed.launcher import WorkerFailure
from sagellm.distributed.wire import decode, encode, register_wire_type
from sagellm.engine.model_runner import ModelInput
from sagellm.protocols import AttentionMetadata, DecodeMetadata, PrefillMetadata

ENGINE = dict(num_kv_blocks=128, max_num_batched_tokens=64, max_prefill_tokens=32)


def _save(path: Path, arch: str, **overrides: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(99)
    model = (LlamaForCausalLM(LlamaConfig(**cfg)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**cfg)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08 if not name.endswith("bias") else 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {
        "llama": _save(root / "llama", "llama"),
        "qwen2": _save(root / "qwen2", "qwen2", tie_word_embeddings=True),
        # One KV head on two ranks (replicated) and a vocabulary that does not split evenly.
        "llama-1kv": _save(root / "llama-1kv", "llama", num_key_value_heads=1, vocab_size=321),
    }


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 60, (n,), generator=g).tolist()  # > max_prefill_tokens: chunked
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]


def _params() -> list[SamplingParams]:
    greedy = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(5)]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    return greedy + [seeded]


@pytest.fixture()
def cleanup() -> Iterator[list[LLM]]:
    made: list[LLM] = []
    yield made
    for llm in made:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-1kv"])
def test_tp2_matches_tp1(tiny_dirs: dict[str, Path], name: str, cleanup: list[LLM]) -> None:
    model = str(tiny_dirs[name])
    vocab = 321 if name == "llama-1kv" else 320
    prompts = _prompts(6, vocab, seed=len(name))
    expected = LLM(model=model, **ENGINE).generate(prompts, _params(), use_tqdm=False)

    llm = LLM(model=model, tensor_parallel_size=2, **ENGINE)
    cleanup.append(llm)
    eng = llm.engine
    assert eng.workers is not None and eng.workers.world_size == 2
    attn = eng.model.layers[0].self_attn
    assert attn.num_heads == 2 and attn.num_kv_heads == 1  # 2 KV heads split, or 1 replicated
    got = llm.generate(prompts, _params(), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert eng.get_stats().num_free_kv_blocks == eng.get_stats().num_kv_blocks
    stats = eng.workers.comm.get_bandwidth_stats().as_dict()
    assert stats["all_reduce"]["calls"] > 0 and stats["all_gather"]["calls"] > 0
    assert stats["broadcast"]["calls"] > 0


def test_worker_crash_stops_engine_with_clear_error(tiny_dirs: dict[str, Path],
                                                    cleanup: list[LLM]) -> None:
    llm = LLM(model=str(tiny_dirs["llama"]), tensor_parallel_size=2, **ENGINE)
    cleanup.append(llm)
    workers = llm.engine.workers
    assert workers is not None
    pid = workers.processes[1].pid
    assert pid is not None
    prompts = _prompts(4, 320, seed=3)
    # Runs to the context limit (256): long enough to be killed mid-way.
    params = SamplingParams(temperature=0, max_tokens=250, ignore_eos=True)
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(0.5)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    with pytest.raises(WorkerFailure, match=r"rank 1 .*SIGKILL.*engine has stopped"):
        llm.generate(prompts, params, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 10
    # Later calls fail at once with the same cause instead of hanging.
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match="SIGKILL"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert time.monotonic() - t0 < 2
    # The process group is gone, so a new multi-rank engine can start in this process.
    again = LLM(model=str(tiny_dirs["llama"]), tensor_parallel_size=2, **ENGINE)
    cleanup.append(again)
    assert len(again.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True),
                              use_tqdm=False)[0].token_ids) == 3


def test_tp_size_must_divide_heads(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(Exception, match="not divisible|multiple"):
        LLM(model=str(tiny_dirs["llama"]), tensor_parallel_size=3, **ENGINE)


# -- the wire format (no processes) ----------------------------------------------------------


def _sample_input() -> ModelInput:
    pre = PrefillMetadata(
        cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32),
        seq_lens=torch.tensor([3, 7], dtype=torch.int32),
        context_lens=torch.tensor([0, 5], dtype=torch.int32),
        block_tables=torch.tensor([[1, 0], [2, 3]], dtype=torch.int32),
        max_seqlen_q=3, max_seqlen_k=7, has_prefix=True, seq_lens_list=[3, 7],
        context_lens_list=[0, 5])
    dec = DecodeMetadata(seq_lens=torch.tensor([9], dtype=torch.int32),
                         block_tables=torch.tensor([[4]], dtype=torch.int32), max_seq_len=9)
    meta = AttentionMetadata(num_prefill_tokens=5, num_decode_tokens=1,
                             slot_mapping=torch.arange(6), prefill=pre, decode=dec)
    return ModelInput(input_ids=torch.arange(6) + 100, positions=torch.tensor([0, 1, 2, 5, 6, 8]),
                      attn_metadata=meta, logits_indices=torch.tensor([2, 4, 5]))


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f))
                                          for f in a.__dataclass_fields__)
    return a == b


def test_wire_roundtrip_is_exact() -> None:
    inp = _sample_input()
    schema, payload = encode(inp, torch.device("cpu"))
    assert all(isinstance(x, int) for x in schema) and payload.dtype == torch.int64
    assert _same(decode(schema, payload), inp)
    # Floating-point tensors travel bit-exact, None stays None.
    from dataclasses import dataclass

    @register_wire_type
    @dataclass
    class Extra:
        x: torch.Tensor
        y: torch.Tensor
        z: float
        w: object

    e = Extra(torch.randn(3, 2, dtype=torch.bfloat16), torch.tensor([True, False]), 0.1, None)
    assert _same(decode(*encode(e, torch.device("cpu"))), e)


def test_wire_refuses_unregistered_and_corrupt() -> None:
    class NotAllowed:
        pass

    with pytest.raises(TypeError, match="register"):
        encode(NotAllowed(), torch.device("cpu"))
    schema, payload = encode(_sample_input(), torch.device("cpu"))
    with pytest.raises(ValueError):
        decode(schema, payload[:-1])


_TORCHRUN_SCRIPT = """
import os, sys
from sagellm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, num_kv_blocks=64)
# Only rank 0 gets here: on rank 1 the constructor served as the worker and ended the process.
outs = llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=6, ignore_eos=True),
                    use_tqdm=False)
print("TOKENS", os.environ["RANK"], [o.token_ids for o in outs], flush=True)
llm.engine.shutdown()
"""


def test_torchrun_ranks_serve_as_workers(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    model = str(tiny_dirs["llama"])
    script = tmp_path / "tp_script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29000 + os.getpid() % 1000), str(script), model],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS")]
    assert len(lines) == 1 and lines[0].startswith("TOKENS 0 ")
    expected = LLM(model=model, num_kv_blocks=64).generate(
        [[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert lines[0] == f"TOKENS 0 {[o.token_ids for o in expected]}"


_TWO_NODE_SCRIPT = """
import os, sys
from sagellm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, num_kv_blocks=64)
topo = llm.engine.workers.topology
outs = llm.generate([[5, 6, 7, 8], [9, 10, 11]],
                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print("TOPO", topo.num_hosts, topo.local_world_size, topo.same_host(0, 1), flush=True)
print("TOKENS", os.environ["RANK"], [o.token_ids for o in outs], flush=True)
llm.engine.shutdown()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_nodes_on_one_machine_match_tp1(tiny_dirs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """``torchrun --nnodes 2``, one rank per "node" (gloo, CPU): greedy tokens equal TP=1's.

    Each node's processes get their own ``SAGELLM_HOST_ID``, so the engine sees two hosts: both
    ranks have LOCAL_RANK 0 (device ``device_index + 0`` on its own node), and each node's rank
    divides only its own node's cores.
    """
    import subprocess
    import sys

    model = str(tiny_dirs["llama"])
    script = tmp_path / "two_nodes.py"
    script.write_text(_TWO_NODE_SCRIPT)
    port = _free_port()
    procs = []
    for node in (0, 1):
        # One thread per rank: both "nodes" share this machine, and each would take every core.
        env = {**os.environ, "SAGELLM_HOST_ID": f"node-{node}", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
             str(port), str(script), model],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    head, worker = results[0][0].splitlines(), results[1][0].splitlines()
    assert not [ln for ln in worker if ln.startswith(("TOKENS", "TOPO"))]  # rank 1 only served
    assert "TOPO 2 1 False" in head
    expected = LLM(model=model, num_kv_blocks=64).generate(
        [[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)
    assert f"TOKENS 0 {[o.token_ids for o in expected]}" in head
