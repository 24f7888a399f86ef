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


def _longrope_freqs(t: torch.Tensor, inv_freq: torch.Tensor, max_position: int,
                    scaling: dict) -> tuple[torch.Tensor, float]:
    """Phi-3's long-rope: per-frequency divisors, ``short_factor`` for positions before
    ``original_max_position_embeddings`` and ``long_factor`` from there on, and cos/sin scaled by
    ``attention_factor`` (default ``sqrt(1 + ln(factor) / ln(original))``).

    The factor is chosen per position, so one table serves every sequence and cached keys never
    change. transformers instead picks one factor per forward from the longest position in it;
    the two agree while a sequence stays within the original context.
    """
    orig = int(scaling["original_max_position_embeddings"])
    half = inv_freq.shape[0]
    short = torch.tensor(scaling["short_factor"], dtype=torch.float64)
    long = torch.tensor(scaling["long_factor"], dtype=torch.float64)
    if short.shape != (half,) or long.shape != (half,):
        raise ValueError(f"longrope short_factor and long_factor need {half} values each, got "
                         f"{short.numel()} and {long.numel()}")
    factors = torch.where((t < orig)[:, None], short[None, :], long[None, :])
    factor = scaling.get("factor") or max_position / orig
    mscale = scaling.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return t[:, None] * (inv_freq[None, :] / factors), float(mscale)


def rope_settings(config, layer_type: str | None = None  # type: ignore[no-untyped-def]
                  ) -> tuple[float, dict | None]:
    """``(base, scaling)`` from an HF config, old style (``rope_theta``/``rope_scaling``) or
    new (``rope_parameters``, possibly one set per layer type, as Gemma 3 has)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", "default")
        if kind == "longrope" and "original_max_position_embeddings" not in params:
            params = {**params, "original_max_position_embeddings":
                      config.original_max_position_embeddings}
        return float(params["rope_theta"]), (None if kind == "default" else params)
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


def partial_rotary_factor(config) -> float:  # type: ignore[no-untyped-def]
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)


def make_rotary(config, head_dim: int, layer_type: str | None = None) -> RotaryEmbedding:  # type: ignore[no-untyped-def]
    """The rotary embedding an HF config asks for (rotating all of ``head_dim``, or the first
    ``partial_rotary_factor`` of it)."""
    base, scaling = rope_settings(config, layer_type)
    rotary_dim = int(head_dim * partial_rotary_factor(config))
    if rotary_dim == head_dim:
        return RotaryEmbedding(head_dim, config.max_position_embeddings, base, scaling)
    return PartialRotaryEmbedding(rotary_dim, config.max_position_embeddings, base, scaling)


_COS_SIN_CACHE: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _cos_sin_table(head_dim: int, max_position: int, base: float, scaling: dict | None
                   ) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    t = torch.arange(max_position, dtype=torch.float64)
    mscale = 1.0
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
    elif kind == "linear":
        inv_freq = inv_freq / float((scaling or {})["factor"])
    elif kind in ("longrope", "su"):
        freqs, mscale = _longrope_freqs(t, inv_freq, max_position, scaling or {})
    elif kind not in ("default", None):
        raise ValueError(f"rope scaling {kind!r} is not supported")
    if kind not in ("longrope", "su"):
        freqs = torch.outer(t, inv_freq)
    return (torch.cat([freqs.cos(), freqs.sin()], -1) * mscale).float()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict | None = None) -> None:
        super().__init__()
        key = (head_dim, max_position, base, repr(sorted((scaling or {}).items())),
               str(torch.empty(0).device))
        cos_sin = _COS_SIN_CACHE.get(key)
        if cos_sin is None:
            cos_sin = _cos_sin_table(head_dim, max_position, base, scaling)
            _COS_SIN_CACHE[key] = cos_sin
        # One table shared by every layer: [max_position, head_dim] fp32 is 16 MiB at 32k
        # positions, which per layer would cost ~0.5 GiB of device memory on a 28-layer model.
        self.register_buffer("cos_sin", cos_sin, persistent=False)
        self.half = head_dim // 2

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] at ``positions`` [T]."""
        table = _rotate_half_table(self.cos_sin)[positions]  # [T, 2D]: [cos | cos | -sin | sin]
        d = 2 * self.half
        cos, sin = table[:, None, :d], table[:, None, d:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin] as x * [cos | cos] + [x2 | x1] *
        # [-sin | sin]: the same products and sums (bit for bit) in four ops instead of nine.
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        out = x * cos + x.roll(self.half, -1) * sin
        return out if dtype == torch.float32 else out.to(dtype)


def _rotate_half_table(cos_sin: torch.Tensor) -> torch.Tensor:
    """``cos_sin`` [P, D] = [cos | sin] -> [P, 2D] = [cos | cos | -sin | sin], made on first use
    and kept on the table itself (every layer's rotary shares its table, so once per model; it
    goes when the table goes)."""
    table = getattr(cos_sin, "_rotate_half", None)
    if table is None:
        cos, sin = cos_sin.chunk(2, -1)
        with torch.inference_mode(False):  # a normal tensor, like the table, whatever the caller
            table = torch.cat([cos, cos, -sin, sin], -1).contiguous()
        cos_sin._rotate_half = table  # type: ignore[attr-defined]
    return table  # type: ignore[no-any-return]


class PartialRotaryEmbedding(RotaryEmbedding):
    """Rotates the first ``rotary_dim`` features of each head and passes the rest through
    (Phi-4-mini). A subclass, so a backend's rotary kernel (swapped by exact type) never sees it."""

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rd = 2 * self.half
        q_rot, k_rot = super().forward(positions, q[..., :rd], k[..., :rd])
        return torch.cat([q_rot, q[..., rd:]], -1), torch.cat([k_rot, k[..., rd:]], -1)
