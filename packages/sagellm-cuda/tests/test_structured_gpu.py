"""Structured output on the GPU: real CUDA graphs, asynchronous mask copies from the reused
page-locked buffers and the Triton mask kernel. Run on a GPU machine:
``pytest -m gpu packages/sagellm-cuda/tests/test_structured_gpu.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.sampling_params import SamplingParams
from sagellm.testing.structured import run_scripted_beside_greedy
from sagellm.testing.tiny_model import make_tiny_llama

pytestmark = pytest.mark.gpu

SCRIPTS = [[5, 9, 200, 31, 63, 64, 7, 7], [17, 17, 2, 255, 95], [128, 1, 1, 96, 3, 4]]


def _cuda_engine(model: Path, **kw: Any):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm_cuda.plugin import CudaPlatform

    config = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=128, max_num_seqs=8,
                          max_model_len=256, enable_prefix_caching=False, **kw)
    return LLMEngine(config, platform=CudaPlatform(0))


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_every_step_masks_with_fresh_state_on_the_gpu(tmp_path: Path, enforce_eager: bool) -> None:
    """Constraints whose allowed token changes every step, arriving one per step beside plain
    greedy rows (prefill graphs, whole and subset decode graphs): any stale or missing mask
    gives a refused token."""
    engine = _cuda_engine(make_tiny_llama(tmp_path), enforce_eager=enforce_eager)
    for out, script in zip(run_scripted_beside_greedy(engine, SCRIPTS), SCRIPTS, strict=True):
        assert out.error is None and list(out.token_ids) == script, out
    if not enforce_eager:
        assert engine.runner.num_graph_steps > 0 and engine.runner.num_prefill_graph_steps > 0


def test_regex_year_on_smollm2() -> None:
    """The server failure ("token 216 is not allowed"), offline on the CUDA backend: after the
    forced ' ' only '1' or '2' may follow."""
    from sagellm import LLM
    from sagellm.structured.params import StructuredOutputParams

    llm = LLM(backend="cuda", num_kv_blocks=512)
    params = SamplingParams(temperature=0, max_tokens=12,
                            structured_output=StructuredOutputParams(regex=r" [12][0-9]{3}"))
    for _ in range(3):  # warm and repeated: the first request after start-up and later ones
        out = llm.generate(["The year is"], params, use_tqdm=False)[0]
        assert out.finish_reason == "stop", out
        assert re.fullmatch(r" [12][0-9]{3}", out.text), out
        assert out.token_ids[0] == 216
    assert torch.cuda.is_available()
