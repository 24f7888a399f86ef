"""GGUF files of the newer families, written from tiny random transformers checkpoints as
llama.cpp's converter writes them (``sagellm.testing.tiny_gguf``, names from ``gguf``'s own map),
load through our loader and generate the checkpoint's greedy tokens (fp32, transformers on the
original checkpoint as reference). Unmapped architectures and tensors are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.loader import gguf_loader
from sagellm.testing.families import engine_greedy, hf_greedy, save_tiny_family
from sagellm.testing.tiny_gguf import write_tiny_gguf
from sagellm.testing.tiny_moe import save_tiny_moe

NEW_TOKENS = 8

#: case -> (builder, family name, overrides GGUF can carry)
CASES = {
    # head_dim 32 != hidden / heads: read from attention.key_length.
    "qwen3": (save_tiny_family, "qwen3", dict(head_dim=32)),
    "qwen3moe": (save_tiny_moe, "qwen3_moe-renorm", {}),
    # llama.cpp takes Gemma's query scale as head_dim (27B aside): the config says the same.
    "gemma2": (save_tiny_family, "gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": (save_tiny_family, "gemma3", dict(query_pre_attn_scalar=16)),
    "phi3": (save_tiny_family, "phi3", {}),
    "mistral": (save_tiny_family, "mistral", {}),
    "mixtral": (save_tiny_moe, "mixtral", {}),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_CACHE", str(tmp_path / "cache"))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in (21, 5)]


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_family_matches_transformers(case: str, tmp_path: Path) -> None:
    build, family, overrides = CASES[case]
    hf_dir = build(tmp_path / "hf", family, **overrides)
    path = write_tiny_gguf(hf_dir, tmp_path / f"{case}.gguf")
    want, _ = hf_greedy(hf_dir, _prompts(), NEW_TOKENS)
    got, _ = engine_greedy(CpuPlatform(), path, _prompts(), NEW_TOKENS)
    assert got == want, case


def test_gguf_config_carries_what_sets_each_family_apart(tmp_path: Path) -> None:
    import json

    from transformers import AutoConfig

    for case in ("gemma3", "phi3", "mixtral"):
        build, family, overrides = CASES[case]
        hf_dir = build(tmp_path / case, family, **overrides)
        want = AutoConfig.from_pretrained(hf_dir)
        conv = gguf_loader.gguf_to_hf_dir(write_tiny_gguf(hf_dir, tmp_path / f"{case}.gguf"))
        got = AutoConfig.from_pretrained(conv)
        assert got.model_type == want.model_type
        for field in ("layer_types", "sliding_window", "num_local_experts",
                      "num_experts_per_tok", "original_max_position_embeddings"):
            assert getattr(got, field, None) == getattr(want, field, None), (case, field)
        head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                    for c in (got, want)]
        assert head_dim[0] == head_dim[1], case
        rope = [json.loads(json.dumps(c.rope_parameters)) for c in (got, want)]
        for key in ("rope_type", "rope_theta", "long_factor", "short_factor", "factor",
                    "full_attention", "sliding_attention"):
            want_value = rope[1].get(key)
            if isinstance(want_value, list):  # long-rope factors are float32 tensors in GGUF
                want_value = pytest.approx(want_value, rel=1e-6)
            assert rope[0].get(key) == want_value, (case, key)
        assert not (conv / "tokenizer.json").exists()  # the file has no tokenizer


def _bare_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unmapped_architecture_is_refused_by_name(tmp_path: Path) -> None:
    path = _bare_gguf(tmp_path / "b.gguf", "bloom", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match="GGUF architecture 'bloom' is not supported"):
        gguf_loader.gguf_to_hf_dir(path)


def test_unknown_tensor_is_refused_by_name(tmp_path: Path) -> None:
    path = _bare_gguf(tmp_path / "q.gguf", "qwen3", {
        "token_embd.weight": np.zeros((4, 8), np.float32),
        "blk.0.mystery.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        gguf_loader.gguf_to_hf_dir(path)
