"""The attention layer: writes new K/V to the paged pool and calls the backend's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sagellm.protocols import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    """Per-forward state handed explicitly down the model (no module globals)."""

    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    backend: AttentionBackend


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
                ) -> torch.Tensor:
        """``q`` [T, H, D], ``k``/``v`` [T, Hkv, D] -> [T, H * D]."""
        meta = ctx.attn_metadata
        key_cache, value_cache = ctx.kv_caches[self.layer_idx]
        backend = ctx.backend
        backend.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        p = meta.num_prefill_tokens
        if meta.decode is None:
            assert meta.prefill is not None
            out = backend.prefill(q, k, v, key_cache, value_cache, meta.prefill, self.scale)
        elif meta.prefill is None:
            out = backend.decode(q, key_cache, value_cache, meta.decode, self.scale)
        else:
            out = torch.empty_like(q)
            out[:p] = backend.prefill(q[:p], k[:p], v[:p], key_cache, value_cache, meta.prefill,
                                      self.scale)
            out[p:] = backend.decode(q[p:], key_cache, value_cache, meta.decode, self.scale)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
