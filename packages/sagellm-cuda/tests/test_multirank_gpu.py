"""Two ranks on two GPUs (NCCL): the start-up topology exchange and TP=2 greedy tokens.

Written on a CPU-only box, not yet run: ``pytest -m gpu packages/sagellm-cuda/tests/test_multirank_gpu.py``
on a machine with at least two CUDA devices (nvidia-h200-x2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sagellm.testing.families import save_tiny_family

    return save_tiny_family(tmp_path_factory.mktemp("tp-gpu"), "llama", vocab_size=320)


def test_tp2_topology_over_nccl_and_greedy_tokens_equal_tp1(llama_dir: Path) -> None:
    from sagellm import LLM, SamplingParams

    prompts = [[5, 6, 7, 8], list(range(10, 50))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = dict(model=str(llama_dir), backend="cuda", dtype="float32", num_kv_blocks=64,
                  enforce_eager=True)
    expected = [o.token_ids for o in LLM(**common).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tensor_parallel_size=2, **common)
    try:
        topo = llm.engine.workers.topology
        assert topo.devices == (0, 1) and topo.all_on_one_host and topo.local_world_size == 2
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == expected
