"""Fused mixture-of-experts: a grouped GEMM over all experts in one Triton launch per projection.

Each token's ``top_k`` (token, expert) pairs are sorted by expert and every expert's run is padded
to a multiple of ``BLOCK_M`` (:func:`align_by_expert`), so each row block of the grouped GEMM
belongs to one expert and multiplies its rows by that expert's weights. The first launch computes
``silu(x W_gate^T) * (x W_up^T)`` per pair from the stacked ``w13`` (both halves in one program,
so the ``[pairs, 2I]`` intermediate never exists); the second multiplies by ``w2`` and by the
pair's routing weight; a sum over ``top_k`` gives each token's output.

Nothing here reads a tensor on the host (expert counts stay on the device, launch grids depend on
the token count only), so a decode step that runs it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm.layers.moe import MoEExperts
from sagellm_cuda.moe_align import align_by_expert
from sagellm_cuda.moe_routing import route
from sagellm_cuda.moe_tiles import tile_configs


# ``num_pairs`` varies with every batch size: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, pairs_ptr, block_expert_ptr, num_padded_ptr,
                     N, K, num_pairs, length, stride_am, stride_be, stride_bn, stride_bk,
                     stride_cm, TOP_K: tl.constexpr, FUSE_SILU: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``c[pair, n] = a[pair // TOP_K] . b[expert, n]`` over one row block x column block.

    With ``FUSE_SILU`` the gate is ``b[:, n]`` and the up projection ``b[:, N + n]``, and ``c``
    gets ``silu(gate) * up``; with ``MUL_WEIGHT`` each row is scaled by ``w[pair]``.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(length, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share their column blocks of b while in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows).to(tl.int64)
    valid = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // TOP_K)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if FUSE_SILU:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if FUSE_SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc *= tl.load(w_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], top_k: int, n: int,
          fuse_silu: bool, mul_weight: bool, cfg: dict[str, int], warmup: bool = False) -> None:
    """One grouped GEMM launch; with ``warmup`` only compiled (into Triton's cache), not run."""
    pairs, block_expert, num_padded = aligned
    assert a.stride(1) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    m, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(pairs.numel(), m) * triton.cdiv(n, bn),)
    args = (a, b, out, weights, pairs, block_expert, num_padded, n, a.shape[1], out.shape[0],
            pairs.numel(), a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0))
    kw = dict(TOP_K=top_k, FUSE_SILU=fuse_silu, MUL_WEIGHT=mul_weight,
              IEEE=a.dtype == torch.float32, **cfg)
    if warmup:
        _moe_gemm_kernel.warmup(*args, grid=grid, **kw)
    else:
        _moe_gemm_kernel[grid](*args, **kw)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: dict[str, int] | None = None,
                  down_config: dict[str, int] | None = None) -> torch.Tensor:
    """What :func:`sagellm.layers.moe.experts_reference` computes: ``x`` [T, H], ``w13``
    [E, 2I, H], ``w2`` [E, H, I], routing [T, k] -> [T, H] in ``x``'s dtype.

    Tiles: ``config`` for the gate/up GEMM (and the down GEMM unless ``down_config`` is given),
    else the device's tuned table or the heuristic (:func:`~sagellm_cuda.moe_tiles.tile_configs`).
    The pairs are aligned once per distinct ``BLOCK_M``.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    x = x.contiguous()
    num_pairs = num_tokens * top_k
    if config is None:
        up_cfg, down_cfg = tile_configs(num_tokens, top_k, num_experts, hidden, inter, x.dtype,
                                        x.device)
    else:
        up_cfg, down_cfg = config, down_config or config
    up_aligned = align_by_expert(topk_ids, num_experts, up_cfg["BLOCK_M"])
    down_aligned = up_aligned if down_cfg["BLOCK_M"] == up_cfg["BLOCK_M"] else \
        align_by_expert(topk_ids, num_experts, down_cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1)
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, act, weights, up_aligned, top_k, inter, True, False, up_cfg)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _gemm(act, w2, down, weights, down_aligned, 1, hidden, False, True, down_cfg)
    return down.view(num_tokens, top_k, hidden).sum(1)


class FusedMoEExperts(MoEExperts):
    """Core's experts layer (``LayerKind.MOE_EXPERTS``): routing in one Triton launch
    (:func:`~sagellm_cuda.moe_routing.route`), then :func:`fused_experts`."""

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        return fused_experts(x, self.w13, self.w2, weights, ids)
