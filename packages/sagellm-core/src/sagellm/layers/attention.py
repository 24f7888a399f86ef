"""The attention layer: writes new K/V to the paged pool and calls the backend's kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sagellm.protocols import (
    AttentionBackend,
    AttentionLayerSpec,
    AttentionMetadata,
    Capabilities,
)


@dataclass
class ForwardContext:
    """Per-forward state handed explicitly down the model (no module globals)."""

    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    backend: AttentionBackend


class Attention(nn.Module):
    """Paged causal attention of one layer.

    ``scale`` defaults to ``head_dim ** -0.5``; ``sliding_window`` and ``logits_soft_cap`` make
    the layer's :class:`~sagellm.protocols.AttentionLayerSpec`, which the backend receives only
    when it departs from plain causal attention.
    """

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.spec = AttentionLayerSpec(sliding_window, logits_soft_cap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
                ) -> torch.Tensor:
        """``q`` [T, H, D], ``k``/``v`` [T, Hkv, D] -> [T, H * D]."""
        meta = ctx.attn_metadata
        key_cache, value_cache = ctx.kv_caches[self.layer_idx]
        backend = ctx.backend
        backend.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        # Backends written before per-layer specs existed take no ``layer`` argument.
        extra: dict[str, Any] = {} if self.spec.is_full else {"layer": self.spec}
        p = meta.num_prefill_tokens
        if meta.decode is None:
            assert meta.prefill is not None
            out = backend.prefill(q, k, v, key_cache, value_cache, meta.prefill, self.scale,
                                  **extra)
        elif meta.prefill is None:
            out = backend.decode(q, key_cache, value_cache, meta.decode, self.scale, **extra)
        else:
            out = torch.empty_like(q)
            out[:p] = backend.prefill(q[:p], k[:p], v[:p], key_cache, value_cache, meta.prefill,
                                      self.scale, **extra)
            out[p:] = backend.decode(q[p:], key_cache, value_cache, meta.decode, self.scale,
                                     **extra)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)


def unsupported_attention(model: nn.Module, caps: Capabilities) -> list[str]:
    """What ``model``'s attention layers need that a platform with ``caps`` lacks, in words
    (empty when it can run the model)."""
    windowed, capped = [], []
    for module in model.modules():
        if isinstance(module, Attention):
            if module.spec.sliding_window is not None and not caps.supports_sliding_window:
                windowed.append(module.layer_idx)
            if module.spec.logits_soft_cap is not None and not caps.supports_logits_soft_cap:
                capped.append(module.layer_idx)
    found = []
    if windowed:
        found.append(f"sliding-window attention (layers {_layer_list(windowed)})")
    if capped:
        found.append(f"attention logit soft-capping (layers {_layer_list(capped)})")
    return found


def kv_window(model: nn.Module) -> int | None:
    """The most keys any query of ``model`` reads when every attention layer has a sliding
    window (the largest window): KV blocks wholly before it can be freed. ``None`` when some
    layer attends to every earlier key (Gemma 2/3 and Qwen's ``max_window_layers`` mix global
    and local layers), since the global layers read every block, or with no attention layer."""
    windows = [m.spec.sliding_window for m in model.modules() if isinstance(m, Attention)]
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)


def freed_kv_window(model: nn.Module, capabilities: Capabilities) -> int | None:
    """The window behind which the engine frees ``model``'s KV blocks on a platform with
    ``capabilities``: :func:`kv_window` where the platform claims
    ``skips_out_of_window_blocks`` (its attention never reads such blocks), else ``None`` (every
    block is kept, whatever the model)."""
    return kv_window(model) if capabilities.skips_out_of_window_blocks else None


def _layer_list(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (f", ... ({len(idx)} in all)" if len(idx) > 8 else "")
