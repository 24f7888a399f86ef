"""Mixtral and Qwen3-MoE on the CUDA backend (fused MoE kernel, CUDA graphs for decode) against
transformers, on the tiny random checkpoints of ``sagellm.testing.tiny_moe``.

fp32: greedy tokens equal transformers' (fp32, CPU) and the logits close. bf16: each token we
pick is within bf16 rounding of the best token of the fp32 reference fed our tokens.
Run on a GPU machine: ``pytest -m gpu packages/sagellm-cuda/tests/test_moe_models_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.testing.families import PARITY_PROMPT_LEN, check_bf16_parity, check_fp32_parity
from sagellm.testing.tiny_moe import TINY_MOE, save_tiny_moe

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 256, (n,), generator=g).tolist()
            for n in (PARITY_PROMPT_LEN, PARITY_PROMPT_LEN + 6, 5)]


@pytest.fixture(scope="module", params=list(TINY_MOE))
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[str, Path]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param, save_tiny_moe(tmp_path_factory.mktemp(request.param), request.param)


def _cuda() -> object:
    from sagellm_cuda.plugin import CudaPlatform

    return CudaPlatform(0)


def test_fused_layer_swapped(moe_dir: tuple[str, Path]) -> None:
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.plugins import Registry
    from sagellm_cuda.moe import FusedMoEExperts

    _, model_dir = moe_dir
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64), registry=Registry(),
                       platform=_cuda())  # type: ignore[arg-type]
    try:
        kinds = {type(m) for m in engine.model.modules()}  # type: ignore[union-attr]
        assert FusedMoEExperts in kinds
    finally:
        engine.shutdown()


def test_fp32_matches_transformers(moe_dir: tuple[str, Path]) -> None:
    name, model_dir = moe_dir
    check_fp32_parity(_cuda(), model_dir, _prompts(), NEW_TOKENS, name)  # type: ignore[arg-type]


def test_bf16_within_bf16_tolerance(moe_dir: tuple[str, Path]) -> None:
    name, model_dir = moe_dir
    check_bf16_parity(_cuda(), model_dir, _prompts(), NEW_TOKENS, name)  # type: ignore[arg-type]
