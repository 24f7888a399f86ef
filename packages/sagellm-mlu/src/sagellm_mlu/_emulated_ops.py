"""TEST-ONLY CPU models of the torch_mlu_ops functions this package calls (``SAGELLM_MLU_EMULATE=cpu``).

Each follows the documented signature and semantics of its torch_mlu_ops namesake as this package
reads them, and checks what the docs require: the paged cache layout ``[blocks, kv_heads,
block_size, dim]`` (contiguous), int32 slot mappings, block tables and context lengths, in-place
outputs. They let CI exercise this package's own code; they prove nothing about the real kernels.
"""

from __future__ import annotations

import torch


def reshape_paged_cache(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor,
                        v_cache: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    assert slot_mapping.dtype == torch.int32, "slot_mapping must be int32"
    assert k_cache.is_contiguous() and k_cache.dim() == 4, "paged cache [blocks, heads, bs, dim]"
    assert k.dim() == 3 and k.shape[1] == k_cache.shape[1] and k.shape[2] == k_cache.shape[3]
    block_size = k_cache.shape[2]
    slots = slot_mapping.long()
    k_cache[slots // block_size, :, slots % block_size] = k
    if v is not None and v_cache is not None:
        v_cache[slots // block_size, :, slots % block_size] = v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
            ) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        offset = k.shape[0] - q.shape[0]
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    cu_seq_lens_q: torch.Tensor, cu_seq_lens_kv: torch.Tensor,
                    alibi_slope: torch.Tensor | None, attn_bias: torch.Tensor | None,
                    max_seq_len_q: int, max_seq_len_kv: int, softmax_scale: float,
                    is_causal: bool, *rest: object) -> torch.Tensor:
    assert q.dim() == 3 and k.dim() == 3, "packed mode: q [total_q, heads, dim]"
    assert alibi_slope is None and attn_bias is None and not rest
    cq, ckv = cu_seq_lens_q.tolist(), cu_seq_lens_kv.tolist()
    assert max(b - a for a, b in zip(cq, cq[1:], strict=False)) <= max_seq_len_q
    for i in range(len(cq) - 1):
        out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ckv[i]:ckv[i + 1]],
                                       v[ckv[i]:ckv[i + 1]], softmax_scale, is_causal)
    return out


def single_query_cached_kv_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                out: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, k_cache_quant_scale: object,
                                v_cache_quant_scale: object, alibi_slopes: object,
                                max_context_len: int, windows_size_left: int,
                                windows_size_right: int, softmax_scale: float) -> torch.Tensor:
    assert q.dim() == 4 and q.shape[1] == 1, "q [batch, seq_q, heads, dim]"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert k_cache.is_contiguous() and k_cache.dim() == 4
    assert (windows_size_left, windows_size_right) == (-1, -1)
    assert k_cache_quant_scale is None and v_cache_quant_scale is None and alibi_slopes is None
    block_size, heads = k_cache.shape[2], k_cache.shape[1]
    for b, length in enumerate(context_lens.tolist()):
        assert length <= max_context_len
        blocks = block_tables[b, : -(-length // block_size)].long()
        k = k_cache[blocks].transpose(1, 2).reshape(-1, heads, k_cache.shape[3])[:length]
        v = v_cache[blocks].transpose(1, 2).reshape(-1, heads, v_cache.shape[3])[:length]
        out[b] = _attend(q[b], k, v, softmax_scale, causal=False)
    return out
