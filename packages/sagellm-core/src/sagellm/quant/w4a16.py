"""4-bit weights, 16-bit activations (W4A16): the layout a GPU dequant-GEMM reads, and the torch
reference of the product it computes.

Layout of a ``[N, K]`` weight in groups of ``group`` inputs (``G = K / group``):

* ``qweight`` int32 ``[K / 8, N]``: input ``k`` of output ``n`` in bits ``4 (k % 8)`` of
  ``qweight[k // 8, n]`` (GPTQ's packing), so a tile of consecutive outputs is one contiguous
  row segment per 8 inputs;
* ``scales``, ``zeros`` ``[G, N]`` in the activation dtype: ``w[n, k] = (code - zeros[g, n]) *
  scales[g, n]`` with ``g = k // group``. GPTQ/AWQ/compressed-tensors zeros are integers (exact
  in 16 bits); the product has one rounding, the same in float32 or in the activation dtype;
* ``perm`` int32 ``[K]`` or ``None`` (act-order): column ``j`` multiplies input ``perm[j]``.

A backend subclasses :class:`W4A16Weight` and overrides :meth:`~W4A16Weight.matmul` with its
kernel; the class here computes the product by dequantizing (tests and references).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.grids import Int4Grid, quantize_int4_zero_point

#: Group sizes tried, largest first, for a weight quantized on load (the first dividing K).
FLOAT_GROUPS = (128, 64, 32)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_k(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` uint8 ``[N, K]`` -> int32 ``[K / 8, N]``, eight inputs per word."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"W4A16 packs 8 inputs per int32: {k} inputs is not a multiple of 8")
    c = codes.t().to(torch.int64).reshape(k // 8, 8, n)
    words = (c << _SHIFTS.to(c.device)[None, :, None]).sum(dim=1)
    return words.to(torch.int32)  # wraps bit 31 into the sign, as the kernel reads it


def unpack_k(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_k`: int32 ``[K / 8, N]`` -> int32 codes ``[K, N]``."""
    kk, n = qweight.shape
    shifts = _SHIFTS.to(device=qweight.device, dtype=torch.int32)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(kk * 8, n)


class W4A16Weight(QuantizedWeight):
    scheme = "int4"
    #: The head stays as loaded: GPTQ/AWQ checkpoints keep it in 16 bits, and its error shows
    #: directly in every logit.
    head_scheme: ClassVar[str | None] = "none"

    def __init__(self, grid: Int4Grid, dtype: torch.dtype | None = None) -> None:
        n, k = grid.codes.shape
        if not self.supports(n, k):
            raise ValueError(f"W4A16 needs [out, in] with in divisible by 32, got [{n}, {k}]")
        self.out_features, self.in_features, self.group = n, k, grid.group
        self.qweight = pack_k(grid.codes)
        scale = grid.scale.float()
        zero = torch.where(scale > 0, -grid.minimum.float() / scale.clamp_min(1e-30),
                           torch.zeros_like(scale))
        dtype = dtype or torch.float32
        self.scales = scale.t().contiguous().to(dtype)   # [G, N]
        self.zeros = zero.t().contiguous().to(dtype)
        self.perm = None if grid.perm is None else grid.perm.to(torch.int32).contiguous()

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return in_features % 32 == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> W4A16Weight:
        k = weight.shape[1]
        group = next(g for g in FLOAT_GROUPS if k % g == 0)
        return cls(quantize_int4_zero_point(weight, group), weight.dtype)

    @classmethod
    def from_grid(cls, grid: object) -> W4A16Weight | None:
        return cls(grid) if isinstance(grid, Int4Grid) else None

    def _for(self, x: torch.Tensor) -> None:
        """Scales and zeros in ``x``'s dtype and device; converted once, at the first product
        (a runner's warm-up, before any graph capture), for a weight packed from a grid."""
        if self.scales.dtype != x.dtype or self.scales.device != x.device:
            self.scales = self.scales.to(x.device, x.dtype)
            self.zeros = self.zeros.to(x.device, x.dtype)
            self.qweight = self.qweight.to(x.device)
            if self.perm is not None:
                self.perm = self.perm.to(x.device)

    def dequantize_k(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[K, N]`` in ``dtype``, columns in the permuted input order (what the
        kernel multiplies)."""
        codes = unpack_k(self.qweight).float()
        g = torch.arange(self.in_features, device=codes.device) // self.group
        w = (codes - self.zeros.float()[g]) * self.scales.float()[g]
        return w.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        self._for(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = x2.float() @ self.dequantize_k(x.dtype).float()
        return y.to(x.dtype).view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        w = self.dequantize_k().t()
        if self.perm is None:
            return w.contiguous()
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None)
