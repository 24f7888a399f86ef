from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _save_tiny(path: Path, arch: str, **overrides: object) -> Path:
    from sagellm.testing.families import save_tiny_family

    return save_tiny_family(path, arch, **{"vocab_size": 320, **overrides})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted to an HF directory (cached across runs)."""
    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    return gguf_to_hf_dir(default_model_path())


@pytest.fixture(scope="session")
def smol_llm(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    from sagellm import LLM

    return LLM(model=None)


@pytest.fixture(scope="session")
def perplexity_ids(smol_llm) -> list[int]:  # type: ignore[no-untyped-def]
    """The perplexity text (``data/declaration_of_independence.txt``) in SmolLM2's tokens."""
    text = (Path(__file__).parent / "data" / "declaration_of_independence.txt").read_text()
    return smol_llm.tokenizer(text).input_ids  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def reference_perplexity(smol_llm, perplexity_ids: list[int]) -> float:  # type: ignore[no-untyped-def]
    """SmolLM2's perplexity on that text, float32 with the weights as loaded: the reference
    every quantized format is checked against (computed once per session)."""
    from sagellm.testing.perplexity import perplexity

    assert smol_llm.engine.config.quantization == "none"
    return perplexity(smol_llm.engine, perplexity_ids)


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]


@pytest.fixture(scope="session")
def prompts():  # type: ignore[no-untyped-def]
    """``prompts(n, vocab, lo, hi, seed)``: random token-id prompts."""
    return random_prompts
