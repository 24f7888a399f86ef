"""The router's softmax, top-k and renormalisation in one Triton launch.

Core's :func:`sagellm.layers.moe.select_experts` is the reference: the same weights (float32, to
rounding of ``exp``) and experts, in descending order of weight. Ties go to the lower expert
index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t,
                  TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                  EP: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, EP)
    t_ok = tokens < num_tokens
    e_ok = (experts < num_experts)[None, :]
    x = tl.load(logits_ptr + tokens[:, None] * stride_t + experts[None, :],
                mask=t_ok[:, None] & e_ok, other=0.0).to(tl.float32)
    x = tl.where(e_ok, x, float("-inf"))  # rows past the last token stay finite
    x = tl.exp(x - tl.max(x, 1)[:, None])
    probs = x / tl.sum(x, 1)[:, None]
    left = tl.where(e_ok, probs, -1.0)
    chosen_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 1)
        idx = tl.min(tl.where(left == best[:, None], experts[None, :], EP), 1)
        tl.store(weights_ptr + tokens * TOP_K + j, best, mask=t_ok)
        tl.store(ids_ptr + tokens * TOP_K + j, idx, mask=t_ok)
        chosen_sum += best
        left = tl.where(experts[None, :] == idx[:, None], -1.0, left)
    if RENORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + tokens * TOP_K + j, mask=t_ok, other=0.0)
            tl.store(weights_ptr + tokens * TOP_K + j, w / chosen_sum, mask=t_ok)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits`` [T, E] -> weights [T, k] float32, expert ids [T, k] int32."""
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be between 1 and the number of experts "
                         f"({num_experts})")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    dev = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=dev)
    if num_tokens == 0:
        return weights, ids
    ep = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // ep))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_T=block_t, EP=ep)
    return weights, ids
