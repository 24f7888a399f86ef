"""int4 weights, a scale and a zero per group of 32 inputs (a checkpoint's 64-256 as stored),
on torch's CPU kernels ``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``.

The kernel computes ``w = (code - 8) * scale + zero``; our grid (:class:`Int4Grid`, GGUF's Q4_1)
is ``w = code * scale + minimum``, so ``zero = minimum + 8 * scale``. Scales and zeros are
stored in bfloat16, the activation dtype of the kernel's fast path.

Long inputs (prefill) go through a dense GEMM instead (:mod:`sagellm.quant.prefill`), on a
weight rebuilt per call from a second copy of the codes (the kernel's packing is tiled per CPU
capability and not read back): ``code - 8`` as one int8 per weight, so the rebuild is three
elementwise passes (convert, times the scale, plus the zero). That copy is 1 byte per weight:
an int4 linear holds about 1.75 bytes per weight (0.5 packed, 1 int8 codes, 0.25 for the scales
and zeros, twice) against 4 for float32 and 2 for bfloat16.

The codes were nibbles (0.5 byte, 1.25 in all) until a profile of a 512-token SmolLM2-135M
prefill showed the unpacking's cost: at one thread the rebuild took about as much CPU as the
bfloat16 GEMMs themselves (0.95 s against 1.05 s), and at two threads on a loaded machine every
elementwise op is a fork/join of the two threads that waits for a descheduled one (a 73k-element
``copy_`` cost 12 ms): the nibble path's six rebuild ops per linear (two shifts, two strided
copies, a multiply, an add) made int4 prefill slower than float32's single ``mm`` per linear.
"""

from __future__ import annotations

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.cpu_features import has_fast_bf16
from sagellm.quant.grids import INT4_GROUP, Int4Grid, quantize_int4
from sagellm.quant.prefill import dense_dtype, dense_matmul

COMPUTE_DTYPE = torch.bfloat16
#: The packing's inner K tiles (an argument the CPU packing takes and does not constrain K by).
INNER_K_TILES = 2
#: The CPU packing works on blocks of 16 output rows.
ROW_BLOCK = 16
#: Group sizes the CPU kernel takes (a checkpoint's grid in another one is requantized).
KERNEL_GROUPS = (32, 64, 128, 256)


class Int4Weight(QuantizedWeight):
    scheme = "int4"
    #: Rows from which the dense GEMM path wins (the rebuild costs about a 64-row GEMM;
    #: measured with native bfloat16 in sagellm.quant.prefill).
    dense_min_tokens = 96
    #: SmolLM2-135M on the shipped text (tests/test_perplexity.py): the head in int4 raised
    #: perplexity 5.8% over float, in int8 0.2%, for about 2 ms more per decode step on 2 cores.
    head_scheme = "int8"

    def __init__(self, grid: Int4Grid) -> None:
        n, k = grid.codes.shape
        if not self.supports(n, k) or grid.group not in KERNEL_GROUPS:
            raise ValueError(f"int4 needs [out, in] with out divisible by {ROW_BLOCK}, in by "
                             f"{INT4_GROUP}, and groups of {KERNEL_GROUPS}; got [{n}, {k}], "
                             f"groups of {grid.group}")
        self.out_features, self.in_features, self.group = n, k, grid.group
        #: Act-order grids (GPTQ desc_act): the inputs in the grid's column order.
        self.perm = grid.perm
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            grid.codes.to(torch.int32), INNER_K_TILES)
        zero = grid.minimum + 8.0 * grid.scale
        self.scales_zeros = torch.stack([grid.scale.t(), zero.t()], dim=-1).to(
            COMPUTE_DTYPE).contiguous()  # [in / group, out, 2]
        self.codes = (grid.codes.to(torch.int8) - 8).contiguous()  # [out, in], -8..7
        # Row-major copies for the dense path: broadcasting the kernel's [in / group, out] layout
        # made the rebuild 5x slower (a 512-token prefill spent 0.5 s in it).
        self.dense_scale, self.dense_zero = (
            self.scales_zeros[..., i].t().contiguous()[..., None] for i in (0, 1))

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return out_features % ROW_BLOCK == 0 and in_features % INT4_GROUP == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int4Weight:
        return cls(quantize_int4(weight, INT4_GROUP))

    @classmethod
    def from_grid(cls, grid: object) -> Int4Weight | None:
        if isinstance(grid, Int4Grid) and grid.group in KERNEL_GROUPS:
            return cls(grid)
        return None

    @classmethod
    def runs_fast(cls) -> bool:
        return has_fast_bf16()

    def dense_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` the kernel multiplies by, ``(code - 8) * scale + zero``, in
        the long-input GEMM's dtype (that path builds it per call)."""
        n, k, g = self.out_features, self.in_features, self.group
        w = self.codes.to(dense_dtype())  # exact: -8..7
        # In place, one op each: an out-of-place addcmul with these broadcasts ran 2.7x slower.
        w.view(n, k // g, g).mul_(self.dense_scale).add_(self.dense_zero)
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if x2.shape[0] >= self.dense_min_tokens:
            y = dense_matmul(x2, self.dense_weight())
            return y.view(*lead, y.shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(COMPUTE_DTYPE), self.packed, self.group, self.scales_zeros)
        return y.to(x.dtype).view(*lead, y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        # Through the kernel itself (float32 identity), so a packing bug shows here too.
        eye = torch.eye(self.in_features)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group, self.scales_zeros.float()).t().contiguous()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.packed, self.scales_zeros, self.codes, self.dense_scale, self.dense_zero))
