"""int8 weights, one scale per output row, on torch's CPU kernel ``_weight_int8pack_mm``.

The kernel's fast path takes bfloat16 activations (float32 ones fall back to a slow
reference loop), so the product runs in bfloat16 and returns in the caller's dtype.
"""

from __future__ import annotations

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.cpu_features import has_fast_bf16
from sagellm.quant.grids import Int8Grid, quantize_int8

COMPUTE_DTYPE = torch.bfloat16


class Int8Weight(QuantizedWeight):
    scheme = "int8"

    def __init__(self, grid: Int8Grid) -> None:
        self.q = grid.q.contiguous()
        self.scale = grid.scale.to(COMPUTE_DTYPE)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(quantize_int8(weight))

    @classmethod
    def from_grid(cls, grid: object) -> Int8Weight | None:
        return cls(grid) if isinstance(grid, Int8Grid) else None

    @classmethod
    def runs_fast(cls) -> bool:
        return has_fast_bf16()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE),
                                               self.q, self.scale)
        return y.to(x.dtype).view(*lead, y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()
