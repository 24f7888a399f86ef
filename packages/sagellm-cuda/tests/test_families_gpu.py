"""Every dense family on the CUDA backend against transformers (tiny random checkpoints of
``sagellm.testing.families``; windows shorter than the prompts, soft-caps, local and global
layers, long-rope).

fp32: greedy tokens equal transformers' (fp32, CPU) and the logits close. bf16: each token we
pick is within bf16 rounding of the best token of the fp32 reference fed our tokens (teacher
forcing), as in ``test_correctness.py``. Decode runs through the CUDA graphs, prefill in chunks.
Run on a GPU machine: ``pytest -m gpu packages/sagellm-cuda/tests/test_families_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.testing.families import (
    PARITY_PROMPT_LEN,
    TINY_FAMILIES,
    engine_greedy,
    hf_greedy,
    save_tiny_family,
)

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16
FAMILIES = [f for f in TINY_FAMILIES if f not in ("llama", "qwen2")]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 256, (n,), generator=g).tolist()
            for n in (PARITY_PROMPT_LEN, PARITY_PROMPT_LEN + 6, 5)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Path]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param, save_tiny_family(tmp_path_factory.mktemp(request.param), request.param)


def _cuda() -> object:
    from sagellm_cuda.plugin import CudaPlatform

    return CudaPlatform(0)


def test_fp32_matches_transformers(family_dir: tuple[str, Path]) -> None:
    family, model_dir = family_dir
    want_tokens, want_logits = hf_greedy(model_dir, _prompts(), NEW_TOKENS)
    got_tokens, got_logits = engine_greedy(_cuda(), model_dir, _prompts(), NEW_TOKENS)  # type: ignore[arg-type]
    assert got_tokens == want_tokens, family
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_bf16_within_bf16_tolerance(family_dir: tuple[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    family, model_dir = family_dir
    ours, _ = engine_greedy(_cuda(), model_dir, _prompts(), NEW_TOKENS, dtype="bfloat16")  # type: ignore[arg-type]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for prompt, toks in zip(_prompts(), ours, strict=True):
        assert len(toks) == NEW_TOKENS
        logits = ref(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1:].float()
        best = logits.max(-1).values
        picked = logits.gather(-1, torch.tensor(toks)[:, None])[:, 0]
        gap = ((best - picked) / logits.std(-1)).max().item()
        assert gap <= 0.1, f"{family}: a token {gap:.4f} std below the reference's best"
