"""FP8 linears on NVIDIA GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper).

Core's :class:`~sagellm.quant.fp8.Fp8Weight` with the products on the GPU:

* decode (at most :data:`~sagellm_cuda.fp8_kernels.GEMV_MAX_M` rows): :func:`fp8_gemv`,
  W8A16 (the activations stay bf16; the weight bytes are what decode pays for);
* prefill with per-channel scales: activations quantized per token (:func:`quantize_rows`) and
  ``torch._scaled_mm`` with row-wise scales on both sides (cuBLASLt);
* prefill with group (block-wise) scales: activations per token and group, then
  :func:`fp8_group_gemm`.

A static ``input_scale`` from the checkpoint replaces the dynamic activation scales in the
W8A8 paths. No path reads a tensor's value on the host, so the linears capture into CUDA graphs.
"""

from __future__ import annotations

import functools

import torch

from sagellm.quant.fp8 import Fp8Weight
from sagellm.quant.fp8_grid import FP8_DTYPE, FP8_MAX, Fp8Grid

#: ``torch._scaled_mm`` wants both dimensions of the weight a multiple of 16.
ALIGN = 16


@functools.cache
def fp8_capable(device_index: int = 0) -> bool:
    """fp8 tensor cores (compute capability 8.9 or newer); false without a CUDA device."""
    try:
        return torch.cuda.get_device_capability(device_index) >= (8, 9)
    except (RuntimeError, AssertionError):
        return False


class CudaFp8Weight(Fp8Weight):
    def __init__(self, grid: Fp8Grid) -> None:
        super().__init__(grid)
        self.q = grid.q.contiguous()
        self.scale = grid.scale.float().contiguous()
        self.group = grid.group
        self.per_channel = self.scale.shape[1] == 1
        self.scale_row = self.scale.t().contiguous() if self.per_channel else None  # [1, N]
        self.input_scale = None if grid.input_scale is None else \
            grid.input_scale.float().reshape(1, 1).to(self.q.device)
        if self.q.is_cuda:  # made now, not first inside a CUDA-graph capture
            from sagellm_cuda.split_k import split_counters

            split_counters(self.q.device)

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return out_features % ALIGN == 0 and in_features % ALIGN == 0

    @classmethod
    def fits(cls, grid: Fp8Grid) -> bool:
        n, k = grid.q.shape
        return cls.supports(n, k) and (grid.scale.shape[1] == 1 or grid.group % ALIGN == 0)

    @classmethod
    def runs_fast(cls) -> bool:
        return True

    def _quantize_input(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        from sagellm_cuda.fp8_kernels import quantize_rows

        if self.input_scale is None:
            return quantize_rows(x, group)
        xq = (x.float() / self.input_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return xq, self.input_scale.expand(x.shape[0], 1).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        from sagellm_cuda.fp8_kernels import GEMV_MAX_M, fp8_gemv, fp8_group_gemm

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if 0 < m <= GEMV_MAX_M:
            y = fp8_gemv(x2 if x2.stride(1) == 1 else x2.contiguous(), self.q, self.scale)
        elif self.per_channel:
            xq, xs = self._quantize_input(x2.contiguous(), self.in_features)
            y = torch._scaled_mm(xq, self.q.t(), scale_a=xs, scale_b=self.scale_row,
                                 out_dtype=torch.bfloat16)
        else:
            xq, xs = self._quantize_input(x2.contiguous(), self.group)
            if xs.shape[1] != self.scale.shape[1]:  # a static input scale: one per row
                xs = xs.expand(m, self.scale.shape[1]).contiguous()
            y = fp8_group_gemm(xq, xs, self.q, self.scale, torch.bfloat16)
        return y.to(x.dtype).view(*lead, self.out_features)
