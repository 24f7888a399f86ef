"""Attention on Cambricon MLUs: torch_mlu_ops where installed, torch reference attention otherwise.

The pool comes from :class:`~sagellm_mlu.kv.MluKVBackend`: the caches handed to these methods are
``transpose(1, 2)`` views of tensors in the vendor layout ``[blocks, kv_heads, block_size, dim]``;
``_native`` recovers those tensors.

With torch_mlu_ops (its documented Python API):

* ``write_kv``: ``reshape_paged_cache(k, v, k_cache, v_cache, slot_mapping)`` (int32 slots).
* ``prefill`` without a cached prefix: ``flash_attention(q, k, v, out, cu_seq_lens_q,
  cu_seq_lens_kv, alibi_slope, attn_bias, max_seq_len_q, max_seq_len_kv, softmax_scale,
  is_causal)`` on the packed new tokens.
* ``decode``: ``single_query_cached_kv_attn(q, k_cache, v_cache, out, block_tables, context_lens,
  k_cache_quant_scale, v_cache_quant_scale, alibi_slopes, max_context_len, windows_size_left,
  windows_size_right, softmax_scale)`` over the paged pool.

Prefill over a cached prefix uses the torch reference (``F.scaled_dot_product_attention``, which
torch_mlu dispatches to its own kernels): the paged variant of ``flash_attention`` is not
documented clearly enough to call blind. Without torch_mlu_ops everything uses the reference.
As on Ascend, an op that raises at run time is logged once and replaced by the reference for the
life of the backend. None of this has run on MLU hardware.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from sagellm.backends.torch_attention import TorchAttentionBackend
from sagellm.protocols import DecodeMetadata, PrefillMetadata

logger = logging.getLogger(__name__)

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _native(cache: torch.Tensor) -> torch.Tensor | None:
    """The vendor-layout tensor behind a contract-layout view, or None if there is none."""
    native = cache.transpose(1, 2)
    return native if native.is_contiguous() else None


class MluAttentionBackend(TorchAttentionBackend):
    name = "mlu-torch-mlu-ops"

    def __init__(self, ops: ModuleType | None) -> None:
        #: torch_mlu_ops, its CPU models under emulation, or None (reference attention only).
        self.ops = ops
        self.fallback_reasons: dict[str, str] = {}

    def uses_fused(self, op: str, dtype: torch.dtype) -> bool:
        return self.ops is not None and op not in self.fallback_reasons and dtype in FUSED_DTYPES

    def _give_up(self, op: str, exc: Exception) -> None:
        self.fallback_reasons[op] = f"{type(exc).__name__}: {exc}"
        logger.warning("torch_mlu_ops %s failed (%s: %s); using torch reference attention for it "
                       "from now on", op, type(exc).__name__, exc)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        valid = slot_mapping >= 0
        if not bool(valid.all()):  # the contract skips negative slots; the op's doc is silent
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
        k_native, v_native = _native(key_cache), _native(value_cache)
        if self.uses_fused("write_kv", key_cache.dtype) and k_native is not None and v_native is not None:
            assert self.ops is not None
            try:
                self.ops.reshape_paged_cache(key.contiguous(), value.contiguous(), k_native,
                                             v_native, slot_mapping.to(torch.int32))
                return
            except RuntimeError as exc:
                self._give_up("write_kv", exc)
        # Index by (block, offset): works on the transposed views, unlike a flat .view().
        block_size = key_cache.shape[1]
        slots = slot_mapping.long()
        key_cache[slots // block_size, slots % block_size] = key
        value_cache[slots // block_size, slots % block_size] = value

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, meta: PrefillMetadata,
                scale: float) -> torch.Tensor:
        if meta.has_prefix or not self.uses_fused("prefill", query.dtype):
            return super().prefill(query, key, value, key_cache, value_cache, meta, scale)
        assert self.ops is not None
        out = torch.empty_like(query)
        try:
            self.ops.flash_attention(query.contiguous(), key.to(query.dtype).contiguous(),
                                     value.to(query.dtype).contiguous(), out, meta.cu_seqlens_q,
                                     meta.cu_seqlens_q, None, None, meta.max_seqlen_q,
                                     meta.max_seqlen_q, scale, True)
        except RuntimeError as exc:
            self._give_up("prefill", exc)
            return super().prefill(query, key, value, key_cache, value_cache, meta, scale)
        return out

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               meta: DecodeMetadata, scale: float) -> torch.Tensor:
        k_native, v_native = _native(key_cache), _native(value_cache)
        if not self.uses_fused("decode", query.dtype) or k_native is None or v_native is None:
            return super().decode(query, key_cache, value_cache, meta, scale)
        assert self.ops is not None
        q = query.unsqueeze(1).contiguous()  # [batch, seq_q=1, heads, dim]
        out = torch.empty_like(q)
        try:
            self.ops.single_query_cached_kv_attn(
                q, k_native, v_native, out, meta.block_tables.to(torch.int32),
                meta.seq_lens.to(torch.int32), None, None, None, meta.max_seq_len, -1, -1, scale)
        except RuntimeError as exc:
            self._give_up("decode", exc)
            return super().decode(query, key_cache, value_cache, meta, scale)
        return out.squeeze(1)
