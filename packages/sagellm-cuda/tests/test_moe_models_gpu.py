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

from sagellm.testing.families import PARITY_PROMPT_LEN, engine_greedy, hf_greedy
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
    want_tokens, want_logits = hf_greedy(model_dir, _prompts(), NEW_TOKENS)
    got_tokens, got_logits = engine_greedy(_cuda(), model_dir, _prompts(), NEW_TOKENS)  # type: ignore[arg-type]
    assert got_tokens == want_tokens, name
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_bf16_within_bf16_tolerance(moe_dir: tuple[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    name, model_dir = moe_dir
    ours, _ = engine_greedy(_cuda(), model_dir, _prompts(), NEW_TOKENS, dtype="bfloat16")  # type: ignore[arg-type]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for prompt, toks in zip(_prompts(), ours, strict=True):
        assert len(toks) == NEW_TOKENS
        logits = ref(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1:].float()
        best = logits.max(-1).values
        picked = logits.gather(-1, torch.tensor(toks)[:, None])[:, 0]
        gap = ((best - picked) / logits.std(-1)).max().item()
        assert gap <= 0.1, f"{name}: a token {gap:.4f} std below the reference's best"
