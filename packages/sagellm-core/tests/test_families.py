"""Every dense family against transformers on a tiny random checkpoint (fp32, CPU): greedy
tokens equal and the logits each token was picked from close, over prompts longer than the
sliding window and than one prefill chunk (so windowed layers read a cached prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.testing.families import (
    PARITY_PROMPT_LEN,
    TINY_FAMILIES,
    engine_greedy,
    hf_greedy,
    save_tiny_family,
)

NEW_TOKENS = 16
NEW_FAMILIES = [f for f in TINY_FAMILIES if f not in ("llama", "qwen2")]


def parity_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lens = [PARITY_PROMPT_LEN, PARITY_PROMPT_LEN + 6, 5]
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Path]:
    family = request.param
    return family, save_tiny_family(tmp_path_factory.mktemp(family), family)


def test_family_matches_transformers(family_dir: tuple[str, Path]) -> None:
    family, model_dir = family_dir
    prompts = parity_prompts(256)
    want_tokens, want_logits = hf_greedy(model_dir, prompts, NEW_TOKENS)
    got_tokens, got_logits = engine_greedy(CpuPlatform(), model_dir, prompts, NEW_TOKENS)
    assert got_tokens == want_tokens, family
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
