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

from sagellm.layers.moe import MoEExperts, select_experts


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs of ``topk_ids`` [T, k] grouped by expert, in row blocks.

    Returns ``sorted_pairs`` [L] int32: flat pair indices (``token * k + choice``) with each
    expert's pairs contiguous and starting on a multiple of ``block_m``, padding holding ``T * k``;
    ``block_expert`` [L / block_m] int32: the expert of each row block (``num_experts`` past the
    end); ``num_padded`` [1]: how many rows of ``sorted_pairs`` are in use. ``L`` is the worst case
    for ``T * k`` pairs, so it depends on the shape only.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    length = n + min(n, num_experts) * (block_m - 1)
    length = -(-length // block_m) * block_m
    sorted_pairs = torch.full((length,), n, dtype=torch.int32, device=dev)
    sorted_pairs[(padded_end - padded)[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert, padded_end[-1:]


@triton.jit
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


def block_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes by the expected rows per expert: decode steps put a handful of rows on each
    expert, so a tall tile would mostly multiply padding."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], top_k: int, n: int,
          fuse_silu: bool, mul_weight: bool, cfg: dict[str, int]) -> None:
    pairs, block_expert, num_padded = aligned
    assert a.stride(1) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    m, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(pairs.numel(), m) * triton.cdiv(n, bn),)
    _moe_gemm_kernel[grid](
        a, b, out, weights, pairs, block_expert, num_padded, n, a.shape[1], out.shape[0],
        pairs.numel(), a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        TOP_K=top_k, FUSE_SILU=fuse_silu, MUL_WEIGHT=mul_weight, IEEE=a.dtype == torch.float32,
        **cfg)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """What :func:`sagellm.layers.moe.experts_reference` computes: ``x`` [T, H], ``w13``
    [E, 2I, H], ``w2`` [E, H, I], routing [T, k] -> [T, H] in ``x``'s dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    x = x.contiguous()
    num_pairs = num_tokens * top_k
    cfg = config or block_config(num_pairs, num_experts)
    aligned = align_by_expert(topk_ids, num_experts, cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, act, weights, aligned, top_k, inter, True, False, cfg)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _gemm(act, w2, down, weights, aligned, 1, hidden, False, True, cfg)
    return down.view(num_tokens, top_k, hidden).sum(1)


class FusedMoEExperts(MoEExperts):
    """Core's experts layer (``LayerKind.MOE_EXPERTS``) through :func:`fused_experts`."""

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return fused_experts(x, self.w13, self.w2, weights, ids)
