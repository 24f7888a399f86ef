"""Fused element-wise kernels, and their registration as replacements for core's layers.

Each kernel rounds at the same points as core's torch code (so outputs match it bit for bit in
most elements), but reads and writes each tensor once instead of once per torch op: residual add
+ RMSNorm is one launch instead of about eight, SiLU*mul one instead of three, and rotary one
launch for queries and keys, in place, instead of about ten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm.layers.activation import SiluAndMul
from sagellm.layers.norm import RMSNorm
from sagellm.layers.registry import LayerKind
from sagellm.layers.rotary import RotaryEmbedding
from sagellm.protocols import LayerRegister
from sagellm_cuda.moe import FusedMoEExperts


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, x_stride, res_stride,
                    out_stride, res_out_stride, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``norm(x [+ residual]) * weight`` and, with a residual, the sum ``x + residual``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, cols = x2.shape
    out = torch.empty_like(x2, dtype=torch.promote_types(weight.dtype, x.dtype))
    res_out = None
    if residual is not None:
        r2 = residual.reshape(-1, shape[-1])
        res_out = torch.empty_like(x2)
    else:
        r2 = x2
    if rows:
        block = triton.next_power_of_2(cols)
        _rmsnorm_kernel[(rows,)](
            x2, r2, weight, out, res_out if res_out is not None else out,
            x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0) if res_out is not None else 0, cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` for ``x`` [..., 2n]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = shape[-1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = 1024
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], n)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                 cs_stride, NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    cos = tl.load(cs_ptr + pos * cs_stride + j, mask=jm, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + j, mask=jm, other=0.0)[None, :]
    hq = tl.arange(0, BLOCK_Q)[:, None]
    qm = (hq < NUM_Q) & jm[None, :]
    qp = q_ptr + t * q_stride_t + hq * q_stride_h + j[None, :]
    x1 = tl.load(qp, mask=qm, other=0.0).to(tl.float32)
    x2 = tl.load(qp + HALF, mask=qm, other=0.0).to(tl.float32)
    tl.store(qp, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=qm)
    tl.store(qp + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=qm)
    hk = tl.arange(0, BLOCK_K)[:, None]
    km = (hk < NUM_K) & jm[None, :]
    kp = k_ptr + t * k_stride_t + hk * k_stride_h + j[None, :]
    y1 = tl.load(kp, mask=km, other=0.0).to(tl.float32)
    y2 = tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32)
    tl.store(kp, (y1 * cos - y2 * sin).to(k_ptr.dtype.element_ty), mask=km)
    tl.store(kp + HALF, (y2 * cos + y1 * sin).to(k_ptr.dtype.element_ty), mask=km)


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   cos_sin: torch.Tensor) -> None:
    """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] in place ("rotate half" layout)."""
    num_tokens, num_q, head_dim = q.shape
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.is_contiguous()
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin.stride(0), NUM_Q=num_q, NUM_K=k.shape[1], HALF=half,
        BLOCK_Q=triton.next_power_of_2(num_q), BLOCK_K=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# Replacements for core's swappable layers (``sagellm.layers.registry``): forward only, reading
# the attributes each kind declares.
# ----------------------------------------------------------------------------------------------


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out, res = rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)  # type: ignore[return-value]


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().forward(positions, q, k)
        rotary_inplace(positions, q, k, self.cos_sin)  # type: ignore[arg-type]
        return q, k


def register_fused_layers(register: LayerRegister) -> None:
    """Offer this package's kernels for core's swappable layers (``Platform.register_layers``)."""
    register(LayerKind.RMS_NORM, FusedRMSNorm)
    register(LayerKind.SILU_AND_MUL, FusedSiluAndMul)
    register(LayerKind.ROTARY_EMBEDDING, FusedRotaryEmbedding)
    register(LayerKind.MOE_EXPERTS, FusedMoEExperts)
