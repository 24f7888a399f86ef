from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _save_tiny(path: Path, arch: str, **overrides: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0)
    common.update(overrides)
    torch.manual_seed(1234)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    # Larger-than-default weights so logits are far from ties and greedy paths are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


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


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]


@pytest.fixture(scope="session")
def prompts():  # type: ignore[no-untyped-def]
    """``prompts(n, vocab, lo, hi, seed)``: random token-id prompts."""
    return random_prompts
