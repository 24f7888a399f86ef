"""Tiny random mixture-of-experts checkpoints (Mixtral, Qwen3-MoE) built with transformers, for
the parity tests on the CPU (``tests/test_moe.py``) and on the GPU
(``sagellm-cuda/tests/test_moe_models_gpu.py``). Shapes and the greedy reference come from
:mod:`sagellm.testing.families`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.testing.families import TINY_COMMON, TINY_WINDOW

#: name -> (transformers config class, model class, overrides of ``TINY_COMMON``)
TINY_MOE: dict[str, tuple[str, str, dict[str, Any]]] = {
    # A window shorter than the prompts, so the windowed attention reads a cached prefix too.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        sliding_window=TINY_WINDOW)),
    # Layer 0 dense (mlp_only_layers), layer 1 sparse; top-3 of 6, not renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=3,
        head_dim=16, mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3_moe-renorm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        head_dim=16, decoder_sparse_step=1, norm_topk_prob=True)),
}


def save_tiny_moe(path: str | Path, name: str, seed: int = 4321, **overrides: Any) -> Path:
    """Build the random ``name`` model of :data:`TINY_MOE` and save it (safetensors, one tensor
    per expert and projection, as transformers writes it) to ``path``."""
    import transformers

    config_cls, model_cls, fields = TINY_MOE[name]
    config = getattr(transformers, config_cls)(**{**TINY_COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                # Router weights larger than the rest: clear top-k choices, no near-ties.
                p.normal_(0, 0.5 if pname.endswith("gate.weight") else 0.08)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path
