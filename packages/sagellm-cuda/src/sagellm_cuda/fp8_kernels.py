"""Triton kernels of the fp8 linears (:mod:`sagellm_cuda.fp8`).

* :func:`quantize_rows` - activations to fp8, one scale per row and ``group`` inputs (dynamic
  per-token or per-token-group quantization), in one kernel.
* :func:`fp8_group_gemm` - W8A8 ``[M, K] x [N, K]^T`` with scales per row and ``group`` inputs on
  both sides (block-wise checkpoints): each ``group``-wide slice of the product is scaled as it
  is accumulated.
* :func:`fp8_gemv` - decode (a few rows): bf16 activations times fp8 weights converted in
  registers (W8A16), per-channel or group scales; bandwidth-bound, so the weight bytes decide,
  and skipping the activation quantization saves a kernel per linear and its error. Optionally
  split over K so a narrow weight still fills the GPU: the last split of each output tile sums
  the float32 partials in the same launch (no zero-fill, no atomics on the output, no cast
  kernel after). Launches come from the device's tuned table (:mod:`sagellm_cuda.gemv_tiles`,
  ``benchmarks/tune_gemv.py``), else a heuristic.

Every launch reads shapes only (no host syncs), so the linears capture into CUDA graphs. Under
``TRITON_INTERPRET=1`` (CPU tests) the same programs run with ``UPCAST`` set: the interpreter
has no fp8 dot, so fp8 tiles are converted to float32 before it (on the GPU they go to the
tensor cores as fp8).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sagellm.quant.fp8_grid import FP8_DTYPE, FP8_MAX, MIN_SCALE
from sagellm_cuda.split_k import plan_split, split_buffers, store_tile


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, GROUP: tl.constexpr,
                          BLOCK: tl.constexpr, FMAX: tl.constexpr, SMIN: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    base = g * GROUP
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, GROUP, BLOCK):
        offs = base + k0 + tl.arange(0, BLOCK)
        mask = (k0 + tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FMAX, SMIN)
    for k0 in range(0, GROUP, BLOCK):
        offs = base + k0 + tl.arange(0, BLOCK)
        mask = (k0 + tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FMAX, FMAX)
        tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * tl.num_programs(1) + g, scale)


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [M, K] fp8, xs [M, K // group] float32)``, as
    :func:`sagellm.quant.fp8_grid.quantize_activations` computes them."""
    m, k = x.shape
    assert k % group == 0, (k, group)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(group), 2048)
        _quantize_rows_kernel[(m, k // group)](x, q, s, k, x.stride(0), GROUP=group, BLOCK=block,
                                               FMAX=FP8_MAX, SMIN=MIN_SCALE,
                                               num_warps=4 if block <= 512 else 8)
    return q, s


@triton.jit
def _group_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, G,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * K + kk[None, :],
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * K + kk[:, None],
                    mask=mask_n[None, :] & (kk[:, None] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        sa = tl.load(as_ptr + offs_m * G + k0 // GROUP, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + offs_n * G + k0 // GROUP, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def fp8_group_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq * xs) @ (wq * ws)^T`` with ``xs [M, G]``, ``ws [N, G]`` one scale per ``K / G``
    inputs (a multiple of 16)."""
    m, k = xq.shape
    n = wq.shape[0]
    g = ws.shape[1]
    group = k // g
    block_k = min(group, 128)
    assert group % block_k == 0 and block_k >= 16, group
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    block_m = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 128))
    _group_gemm_kernel[grid](xq, xs, wq, ws, y, m, n, k, g, GROUP=group, BLOCK_M=block_m,
                             BLOCK_N=128, BLOCK_K=block_k, UPCAST=_interpreted(),
                             num_warps=4 if block_m == 64 else 8, num_stages=3)
    return y


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, G, stride_x,
                 K_PER_SPLIT, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 SPLIT: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[m, n] = sum_k x[m, k] * w[n, k] * scale``, one ``BLOCK_N`` slice of outputs and one
    split of the inputs a program. ``USE_DOT``: ``BLOCK_M`` rows through ``tl.dot``; else one
    row (``BLOCK_M == 1``, program axis 1 the row) as multiply-and-sum, the weight tile loaded
    along its contiguous K. ``SPLIT``: each split stores its float32 partial, and the last split
    of a tile to finish (a counter per tile) sums them in split order and writes ``y``; it
    resets the counter, so the next launch (or graph replay) finds it zero."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the tile's rows (USE_DOT)
    mask_m = offs_m < M
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        kk = k0 + offs_k
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + kk[None, :],
                        mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None],
                        mask=mask_n[None, :] & (kk[:, None] < K), other=0.0).to(x.dtype)
            part = tl.dot(x, w)
        else:
            x = tl.load(x_ptr + pid_m * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :],
                        mask=mask_n[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)
        if PER_CHANNEL:
            acc += part
        else:
            # A split's tiles past K have no scale column (the last row's would be read out
            # of bounds, and NaN there times a zero part is still NaN).
            s = tl.load(s_ptr + offs_n * G + k0 // GROUP, mask=mask_n & (offs_n * 0 + k0 < K),
                        other=0.0)
            if USE_DOT:
                acc += part * s[None, :]
            else:
                acc += part * s
    if PER_CHANNEL:
        sc = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if USE_DOT:
            acc = acc * sc[None, :]
        else:
            acc = acc * sc
    store_tile(acc, y_ptr, part_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, pid_m, pid_n,
               split, M, N, USE_DOT, SPLIT)


#: The most activation rows :func:`fp8_gemv` takes (one ``tl.dot`` tile of rows).
GEMV_MAX_M = 16
_GEMV_BLOCK_N = 32
_GEMV_BLOCK_K = 128


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def gemv_split_k(n: int, k: int, device: torch.device, block_n: int = _GEMV_BLOCK_N,
                 block_k: int = _GEMV_BLOCK_K) -> int:
    """Splits over K so that about four programs per SM stream the weight, each split at least
    four K tiles."""
    programs = triton.cdiv(n, block_n)
    want = triton.cdiv(4 * _num_sms(device), programs)
    most = max(1, k // (4 * block_k))
    return max(1, min(want, most))


def gemv_heuristic(m: int, n: int, k: int, group: int, device: torch.device) -> dict[str, int]:
    """The launch when the device has no tuned table for the shape (``group`` 0: per-channel
    scales): 16-row dot tiles 32 outputs by 128 inputs, split to fill the GPU."""
    block_k = _GEMV_BLOCK_K if group == 0 else min(group, _GEMV_BLOCK_K)
    return dict(BLOCK_M=GEMV_MAX_M, BLOCK_N=_GEMV_BLOCK_N, BLOCK_K=block_k,
                SPLIT_K=gemv_split_k(n, k, device, _GEMV_BLOCK_N, block_k), num_warps=4,
                num_stages=4)


def gemv_config(m: int, n: int, k: int, group: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, int]:
    """The device table's config for the shape (:mod:`sagellm_cuda.gemv_tiles`), else
    :func:`gemv_heuristic`."""
    from sagellm_cuda.gemv_tiles import tuned_config

    return (tuned_config("fp8", m, n, k, group, dtype, device)
            or gemv_heuristic(m, n, k, group, device))


def fp8_gemv(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, split_k: int | None = None,
             config: dict[str, int] | None = None) -> torch.Tensor:
    """``x [M <= 16, K] @ (wq * ws)^T`` in ``x``'s dtype, ``ws [N, 1]`` per channel or
    ``[N, K / group]``. ``config`` (:data:`sagellm_cuda.gemv_tiles.FIELDS`) overrides the
    table/heuristic launch, ``split_k`` its split."""
    m, k = x.shape
    n = wq.shape[0]
    g = ws.shape[1]
    assert m <= GEMV_MAX_M, m
    per_channel = g == 1
    group = k // g
    cfg = dict(config or gemv_config(m, n, k, 0 if per_channel else group, x.dtype, x.device))
    if split_k:
        cfg["SPLIT_K"] = split_k
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not per_channel and group % block_k:
        raise ValueError(f"fp8_gemv: BLOCK_K={block_k} must divide the scale group {group}")
    use_dot = block_m > 1
    if use_dot and (block_m < GEMV_MAX_M or block_n < 16 or block_k < 16):
        raise ValueError(f"fp8_gemv: a tl.dot launch needs BLOCK_M={GEMV_MAX_M} and BLOCK_N, "
                         f"BLOCK_K >= 16, got {cfg}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    m_programs = triton.cdiv(m, block_m) if use_dot else m
    n_programs = triton.cdiv(n, block_n)
    per_split, splits = plan_split(k, block_k, cfg["SPLIT_K"], m_programs * n_programs)
    part, counters = split_buffers(y, splits)
    _gemv_kernel[(n_programs, m_programs, splits)](
        x, wq, ws, y, part, counters, m, n, k, g, x.stride(0), per_split, GROUP=group,
        PER_CHANNEL=per_channel, SPLIT=splits > 1, USE_DOT=use_dot, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y
