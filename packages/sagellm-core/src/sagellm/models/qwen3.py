"""The Qwen3 dense family: Llama's block with an RMSNorm over each query and key head.

:class:`Qwen3Attention` is also the attention of Qwen3-MoE (and, with Gemma's norm, of Gemma 3).
"""

from __future__ import annotations

import torch
from torch import nn

from sagellm.layers.norm import RMSNorm
from sagellm.layers.parallel import TPGroup
from sagellm.layers.rotary import RotaryEmbedding
from sagellm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    """Llama attention whose queries and keys are RMS-normalised per head (``q_norm``,
    ``k_norm``: one ``[head_dim]`` weight each) before the rotary embedding."""

    norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, config, layer_idx: int, tp: TPGroup, qkv_bias: bool = False,  # type: ignore[no-untyped-def]
                 scale: float | None = None, logits_soft_cap: float | None = None,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__(config, layer_idx, tp, qkv_bias, scale, logits_soft_cap, rotary)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = self.norm_cls(self.head_dim, eps)
        self.k_norm = self.norm_cls(self.head_dim, eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_features = frozenset({"sliding_window"})

    def make_attention(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return Qwen3Attention(config, layer_idx, tp)
