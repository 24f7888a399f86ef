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
    check_bf16_parity,
    check_fp32_parity,
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
    name, model_dir = family_dir
    check_fp32_parity(_cuda(), model_dir, _prompts(), NEW_TOKENS, name)  # type: ignore[arg-type]


def test_bf16_within_bf16_tolerance(family_dir: tuple[str, Path]) -> None:
    name, model_dir = family_dir
    check_bf16_parity(_cuda(), model_dir, _prompts(), NEW_TOKENS, name)  # type: ignore[arg-type]
