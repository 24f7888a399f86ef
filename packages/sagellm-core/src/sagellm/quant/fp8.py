"""FP8 W8A8 weights in torch, the reference every backend's fp8 kernels are held to.

The CPU registers it so that ``--quantization fp8`` (and an FP8 checkpoint run as fp8) can be
checked for accuracy without an accelerator; it dequantizes the weight for every product, so it
is slower than float (``runs_fast`` is false and ``quantization=auto`` never picks it). A
backend with fp8 hardware subclasses it and replaces :meth:`Fp8Weight.matmul` only
(``sagellm_cuda.fp8``).
"""

from __future__ import annotations

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.fp8_grid import Fp8Grid, quantize_fp8, reference_matmul


class Fp8Weight(QuantizedWeight):
    scheme = "fp8"
    #: The LM head stays in the model's dtype, as publishers' FP8 checkpoints ship it: an fp8
    #: head is the largest error for a 1/32 share of a large model's bytes (0.8 GB of 8 GB).
    head_scheme = "none"

    def __init__(self, grid: Fp8Grid) -> None:
        self.grid = grid
        self.out_features, self.in_features = grid.q.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Fp8Weight:
        """Per output channel scales, dynamic per-token activations."""
        return cls(quantize_fp8(weight))

    @classmethod
    def from_grid(cls, grid: object) -> Fp8Weight | None:
        return cls(grid) if isinstance(grid, Fp8Grid) and cls.fits(grid) else None

    @classmethod
    def fits(cls, grid: Fp8Grid) -> bool:
        """Whether this class's kernels run ``grid``'s scale layout (all of them, here)."""
        return True

    @classmethod
    def runs_fast(cls) -> bool:
        return False

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = reference_matmul(x.reshape(-1, self.in_features), self.grid)
        return y.to(x.dtype).view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.grid.dequantize()

    @property
    def nbytes(self) -> int:
        g = self.grid
        extra = 0 if g.input_scale is None else 4
        return g.q.numel() + g.scale.numel() * g.scale.element_size() + extra
