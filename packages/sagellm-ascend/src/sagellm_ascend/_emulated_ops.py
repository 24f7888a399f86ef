"""TEST-ONLY CPU models of the torch_npu ops this package calls (``SAGELLM_ASCEND_EMULATE=cpu``).

Each function follows the documented signature and semantics of its torch_npu namesake as this
package reads them, and checks the arguments the real op is documented to require (int32 slot and
block tables, contiguous ND inputs, the 2048x2048 mask of sparse_mode 3, keyword-only arguments).
They let CI exercise the metadata that ``AscendAttentionBackend`` builds; they prove nothing about
the real kernels.
"""

from __future__ import annotations

import torch

#: Unlike the real ops, the models also take float32 so results compare tightly with the CPU.
SAGELLM_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _npu_reshape_and_cache(*, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
    assert slot_indices.dtype == torch.int32, "torch_npu needs int32 slot_indices"
    assert key_cache.dim() == 4 and key_cache.is_contiguous(), "ND cache [blocks, bs, heads, dim]"
    assert key.dim() == 3 and key.shape[1:] == key_cache.shape[2:], (key.shape, key_cache.shape)
    assert key.dtype == key_cache.dtype and value.dtype == value_cache.dtype
    block_size = key_cache.shape[1]
    keep = slot_indices >= 0
    slots = slot_indices[keep].long()
    key_cache[slots // block_size, slots % block_size] = key[keep]
    value_cache[slots // block_size, slots % block_size] = value[keep]


def _paged(cache: torch.Tensor, table: torch.Tensor, length: int, num_kv_heads: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = table[: -(-length // block_size)].long()
    return cache[blocks].reshape(-1, num_kv_heads, cache.shape[-1] // num_kv_heads)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
            ) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:  # right-down aligned: the last query sees every key
        offset = k.shape[0] - q.shape[0]
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def npu_fused_infer_attention_score(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    atten_mask: torch.Tensor | None = None, actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None, block_table: torch.Tensor | None = None,
    num_heads: int = 1, scale: float = 1.0, input_layout: str = "BSH",
    num_key_value_heads: int = 0, sparse_mode: int = 0, block_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert query.is_contiguous(), "the op rejects non-contiguous query"
    kv_heads = num_key_value_heads or num_heads
    causal = sparse_mode == 3
    if causal:
        assert atten_mask is not None and atten_mask.shape == (2048, 2048), "sparse_mode 3 mask"
        assert atten_mask.dtype == torch.bool and bool(atten_mask[0, 1]) and not bool(atten_mask[1, 0])
    else:
        assert sparse_mode == 0 and atten_mask is None, "only sparse_mode 0 (no mask) or 3 modelled"
    if block_table is not None:
        assert block_table.dtype == torch.int32 and block_size == key.shape[1], "paged arguments"
        assert key.dim() == 3 and key.shape[-1] % kv_heads == 0, "paged key is [blocks, bs, H*D]"
        assert actual_seq_lengths_kv is not None
    if input_layout == "TND":
        assert query.dim() == 3 and query.shape[1] == num_heads and actual_seq_lengths is not None
        outs, start = [], 0
        for i, end in enumerate(actual_seq_lengths):
            q = query[start:end]
            if block_table is None:
                kv_start = 0 if i == 0 else actual_seq_lengths_kv[i - 1]  # type: ignore[index]
                k = key[kv_start:actual_seq_lengths_kv[i]]  # type: ignore[index]
                v = value[kv_start:actual_seq_lengths_kv[i]]  # type: ignore[index]
            else:
                k = _paged(key, block_table[i], actual_seq_lengths_kv[i], kv_heads)  # type: ignore[index]
                v = _paged(value, block_table[i], actual_seq_lengths_kv[i], kv_heads)  # type: ignore[index]
            outs.append(_attend(q, k, v, scale, causal))
            start = end
        assert start == query.shape[0], "actual_seq_lengths must be cumulative and cover the batch"
        return torch.cat(outs), torch.empty(0)
    assert input_layout == "BSH" and query.dim() == 3 and query.shape[1] == 1, "decode is BSH, S=1"
    assert block_table is not None, "only the paged incremental branch is modelled"
    head_dim = query.shape[2] // num_heads
    outs = []
    for b in range(query.shape[0]):
        q = query[b].view(1, num_heads, head_dim)
        k = _paged(key, block_table[b], actual_seq_lengths_kv[b], kv_heads)  # type: ignore[index]
        v = _paged(value, block_table[b], actual_seq_lengths_kv[b], kv_heads)  # type: ignore[index]
        outs.append(_attend(q, k, v, scale, causal=False).reshape(1, 1, num_heads * head_dim))
    return torch.cat(outs), torch.empty(0)
