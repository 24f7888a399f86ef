"""int8 weights, one scale per output row, on torch's CPU kernel ``_weight_int8pack_mm``.

The kernel's fast path takes bfloat16 activations (float32 ones fall back to a slow
reference loop), so the product runs in bfloat16 and returns in the caller's dtype. Long inputs
(prefill) go through a bfloat16 GEMM on the int8 values instead (:mod:`sagellm.quant.prefill`).
"""

from __future__ import annotations

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.cpu_features import has_fast_bf16
from sagellm.quant.grids import Int8Grid, quantize_int8
from sagellm.quant.prefill import dense_matmul

COMPUTE_DTYPE = torch.bfloat16


class Int8Weight(QuantizedWeight):
    scheme = "int8"
    #: Rows from which the bfloat16 GEMM path wins (int8 -> bfloat16 is one cheap cast;
    #: measured in sagellm.quant.prefill).
    dense_min_tokens = 16

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
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= self.dense_min_tokens:
            # int8 values are exact in bfloat16; the row scale applies to the product.
            y = dense_matmul(x2, self.q.to(COMPUTE_DTYPE), self.scale)
            return y.view(*lead, y.shape[-1])
        y = torch.ops.aten._weight_int8pack_mm(x2.to(COMPUTE_DTYPE), self.q, self.scale)
        return y.to(x.dtype).view(*lead, y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()
