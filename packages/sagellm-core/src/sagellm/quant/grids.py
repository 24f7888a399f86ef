"""The two weight grids sageLLM stores, as plain tensors (no packing, no kernels).

* int8, symmetric, one scale per output row: ``w[n, k] ~ q[n, k] * scale[n]``, ``q`` in
  ``[-127, 127]``.
* int4, asymmetric, one scale and one minimum per ``group`` consecutive inputs of a row:
  ``w[n, k] ~ codes[n, k] * scale[n, k // group] + minimum[n, k // group]``, ``codes`` in
  ``[0, 15]``. This is GGUF's Q4_1 grid (``Q4_0`` is the special case ``minimum = -8 * scale``),
  so those blocks map onto it without requantizing. GPTQ/AWQ/compressed-tensors' grid
  ``(code - zero) * scale`` with an integer ``zero`` is the case ``minimum = -zero * scale``
  (exact in float32 for float16 scales). Act-order checkpoints (GPTQ ``desc_act``) store the
  inputs' groups out of order: the grid then holds the inputs sorted by group, column ``j`` being
  input ``perm[j]``, so that every group is again ``group`` consecutive columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 32


@dataclass
class Int8Grid:
    q: torch.Tensor       # int8 [N, K]
    scale: torch.Tensor   # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


@dataclass
class Int4Grid:
    codes: torch.Tensor    # uint8 [N, K], values 0..15
    scale: torch.Tensor    # float32 [N, K // group]
    minimum: torch.Tensor  # float32 [N, K // group]
    #: int64 [K]: column ``j`` holds input ``perm[j]``; ``None``: inputs in order.
    perm: torch.Tensor | None = None

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group
        w = self.codes.view(n, k // g, g).float() * self.scale[..., None] + self.minimum[..., None]
        w = w.view(n, k)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def quantize_int8(w: torch.Tensor) -> Int8Grid:
    """Round-to-nearest per output row; the largest magnitude of each row maps to 127."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Grid(q, scale)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Grid:
    """Round-to-nearest per group between the group's minimum and maximum (codes 0 and 15).

    Applied to GGUF Q4_1 weights dequantized to float, this returns the stored codes again
    (llama.cpp puts each block's minimum at code 0 and maximum at 15), up to float rounding.
    """
    wg, lo, hi = _groups(w, group)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Grid(codes.view(w.shape), scale, lo)


def quantize_int4_zero_point(w: torch.Tensor, group: int) -> Int4Grid:
    """Round-to-nearest with an integer zero point, GPTQ's and AWQ's grid: per group
    ``scale = (max - min) / 15``, ``zero = round(-min / scale)`` in ``[0, 15]``,
    ``code = clamp(round(w / scale) + zero, 0, 15)``; ``w ~ (code - zero) * scale``."""
    wg, lo, hi = _groups(w, group)
    scale = ((hi - lo) / 15.0).clamp_min(1e-5)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    codes = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Grid(codes.view(w.shape), scale, -zero * scale)


def _groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [N, K] as float groups [N, K / group, group], with each group's min and max."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs input features ({k}) divisible by the group size ({group})")
    wg = w.float().view(n, k // group, group)
    return wg, wg.amin(dim=-1), wg.amax(dim=-1)
