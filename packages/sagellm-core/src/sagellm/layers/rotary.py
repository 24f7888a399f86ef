"""Rotary position embedding (the "rotate half" layout used by Llama and Qwen2 checkpoints)."""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, mid, scaled)


def rope_settings(config) -> tuple[float, dict | None]:  # type: ignore[no-untyped-def]
    """``(base, scaling)`` from an HF config, old style (``rope_theta``/``rope_scaling``) or
    new (``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", "default")
        return float(params["rope_theta"]), (None if kind == "default" else params)
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


_COS_SIN_CACHE: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif kind == "linear":
            inv_freq = inv_freq / float((scaling or {})["factor"])
        elif kind not in ("default", None):
            raise ValueError(f"rope scaling {kind!r} is not supported")
        key = (head_dim, max_position, base, repr(sorted((scaling or {}).items())),
               str(torch.empty(0).device))
        cos_sin = _COS_SIN_CACHE.get(key)
        if cos_sin is None:
            t = torch.arange(max_position, dtype=torch.float64)
            freqs = torch.outer(t, inv_freq)
            cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).float()
            _COS_SIN_CACHE[key] = cos_sin
        # One table shared by every layer: [max_position, head_dim] fp32 is 16 MiB at 32k
        # positions, which per layer would cost ~0.5 GiB of device memory on a 28-layer model.
        self.register_buffer("cos_sin", cos_sin, persistent=False)
        self.half = head_dim // 2

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] at ``positions`` [T]."""
        cs = self.cos_sin[positions]
        cos, sin = cs[:, None, : self.half], cs[:, None, self.half:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x1, x2 = x[..., : self.half], x[..., self.half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dtype)
