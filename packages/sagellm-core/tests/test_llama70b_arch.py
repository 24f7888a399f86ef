"""The Llama-3.1-70B architecture directory (benchmarks/models/llama3.1-70b-arch), built on meta.

No weights are allocated: the model is constructed under ``torch.device("meta")``, so the
parameter count (70.6B) and the per-rank share at TP=2 are checked in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.layers.parallel import TPGroup
from sagellm.models import resolve_model_class

ARCH = Path(__file__).parents[1] / "benchmarks" / "models" / "llama3.1-70b-arch"


def _build(tp: TPGroup) -> torch.nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(ARCH))
    with torch.device("meta"):
        return resolve_model_class(config)(config, tp)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_is_the_published_architecture() -> None:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(ARCH))
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (80, 8192, 64, 8, 28672, 128256)
    assert c.max_position_embeddings == 131072 and c.rms_norm_eps == 1e-5
    rope = c.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192
    theta = c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"]
    assert theta == 500000.0
    assert str(c.torch_dtype).endswith("bfloat16")
    assert (ARCH / "tokenizer.json").is_file() and (ARCH / "README.md").is_file()


def test_meta_model_has_70_6b_parameters() -> None:
    model = _build(TPGroup())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.layers) == 80
    # 80 x (attention 151.0M + MLP 704.6M + norms) + embedding and LM head 2 x 1.05B
    assert round(_count(model) / 1e9, 1) == 70.6
    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (64, 8)


def test_tp2_shard_is_half_and_fits_one_h200_in_bf16() -> None:
    full = _count(_build(TPGroup()))
    shard = _count(_build(TPGroup(rank=1, size=2)))
    # Norm weights are replicated, everything else is split in two.
    assert full / 2 <= shard < full / 2 + 1e6
    assert shard * 2 / 2**30 < 70  # GiB of bf16 weights per rank: leaves room for KV on 141 GB


@pytest.mark.parametrize("size", [3, 6])
def test_tp_sizes_that_do_not_split_the_heads_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _build(TPGroup(rank=0, size=size))
