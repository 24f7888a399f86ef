"""Attention on Ascend through torch_npu's fused inference ops.

* ``write_kv``: ``torch_npu._npu_reshape_and_cache(key=, value=, key_cache=, value_cache=,
  slot_indices=)`` (int32 slots, ND cache ``[num_blocks, block_size, kv_heads, head_dim]``).
* ``prefill``: ``torch_npu.npu_fused_infer_attention_score`` with ``input_layout="TND"`` and
  ``sparse_mode=3`` (right-down causal, the documented 2048x2048 mask). Without a cached prefix it
  attends over the new tokens' own keys (``actual_seq_lengths_kv`` cumulative like the queries);
  with a prefix it reads the paged pool (``block_table``, per-sequence ``actual_seq_lengths_kv``).
* ``decode``: the same op in its incremental branch (query length 1, ``input_layout="BSH"``) over
  the paged pool.

The fused ops take only float16/bfloat16. Any other dtype, and any op that raises at run time (an
unsupported shape or block size on a given CANN release), falls back to the torch reference
attention of ``sagellm.backends.torch_attention``; a failure is logged once and that op stays on
the reference path for the life of the backend, so a kernel limit costs speed, never a crash.

Written against the torch_npu documentation (API reference of ``npu_fused_infer_attention_score``,
releases 6.0 and 7.x) and the op's use in public Ascend inference code; it has not run on Ascend
hardware. Older torch_npu releases name the scale argument ``scale_value``: handled by retrying
once with that name.
"""

from __future__ import annotations

import itertools
import logging
from types import ModuleType
from typing import Any

import torch

from sagellm.backends.torch_attention import TorchAttentionBackend
from sagellm.protocols import DecodeMetadata, PrefillMetadata

logger = logging.getLogger(__name__)

#: dtypes the fused ops accept (int8 too, for quantised caches, which sageLLM does not use).
FUSED_DTYPES = (torch.float16, torch.bfloat16)
#: ``sparse_mode`` 2-4 take this fixed-size causal mask (True = masked).
MASK_SIZE = 2048


class AscendAttentionBackend(TorchAttentionBackend):
    name = "ascend-fused-infer-attention"

    def __init__(self, ops: ModuleType | None) -> None:
        #: torch_npu, its CPU models under emulation, or None (reference attention only).
        self.ops = ops
        self.fallback_reasons: dict[str, str] = {}
        self._scale_kw = "scale"
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._host_lens: tuple[object, list[int]] | None = None

    # -- helpers ---------------------------------------------------------------------------

    def uses_fused(self, op: str, dtype: torch.dtype) -> bool:
        if self.ops is None or op in self.fallback_reasons:
            return False
        return dtype in getattr(self.ops, "SAGELLM_FUSED_DTYPES", FUSED_DTYPES)

    def _give_up(self, op: str, exc: Exception) -> None:
        self.fallback_reasons[op] = f"{type(exc).__name__}: {exc}"
        logger.warning("Ascend fused %s failed (%s: %s); using torch reference attention for it "
                       "from now on", op, type(exc).__name__, exc)

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        mask = self._masks.get(device)
        if mask is None:
            mask = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device).triu_(1)
            self._masks[device] = mask
        return mask

    def _fia(self, **kwargs: Any) -> torch.Tensor:
        assert self.ops is not None
        scale = kwargs.pop("scale")
        try:
            return self.ops.npu_fused_infer_attention_score(**kwargs, **{self._scale_kw: scale})[0]
        except TypeError:
            if self._scale_kw != "scale":
                raise
            self._scale_kw = "scale_value"  # torch_npu 6.0.x spelling
            return self.ops.npu_fused_infer_attention_score(**kwargs, scale_value=scale)[0]

    def _decode_lens(self, meta: DecodeMetadata) -> list[int]:
        """Host copy of ``meta.seq_lens``, made once per forward (every layer shares ``meta``)."""
        if self._host_lens is None or self._host_lens[0] is not meta:
            self._host_lens = (meta, [int(n) for n in meta.seq_lens.cpu().tolist()])
        return self._host_lens[1]

    # -- the contract ----------------------------------------------------------------------

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.uses_fused("write_kv", key_cache.dtype):
            assert self.ops is not None
            try:
                # The op skips negative slots (its reference implementation does), like the contract.
                self.ops._npu_reshape_and_cache(
                    key=key.to(key_cache.dtype).contiguous(),
                    value=value.to(value_cache.dtype).contiguous(),
                    key_cache=key_cache, value_cache=value_cache,
                    slot_indices=slot_mapping.to(torch.int32))
                return
            except RuntimeError as exc:
                self._give_up("write_kv", exc)
        super().write_kv(key, value, key_cache, value_cache, slot_mapping)

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, meta: PrefillMetadata,
                scale: float) -> torch.Tensor:
        if not self.uses_fused("prefill", query.dtype):
            return super().prefill(query, key, value, key_cache, value_cache, meta, scale)
        num_heads, head_dim = query.shape[1], query.shape[2]
        seq_lens = meta.seq_lens_list or [int(n) for n in meta.seq_lens.tolist()]
        ctx_lens = meta.context_lens_list or [int(n) for n in meta.context_lens.tolist()]
        q_ends = list(itertools.accumulate(s - c for s, c in zip(seq_lens, ctx_lens, strict=True)))
        common: dict[str, Any] = dict(
            query=query.contiguous(), atten_mask=self._causal_mask(query.device),
            actual_seq_lengths=q_ends, num_heads=num_heads, num_key_value_heads=key.shape[1],
            input_layout="TND", sparse_mode=3, scale=scale)
        try:
            if not meta.has_prefix:
                out = self._fia(key=key.to(query.dtype).contiguous(),
                                value=value.to(query.dtype).contiguous(),
                                actual_seq_lengths_kv=q_ends, **common)
            else:
                num_blocks, block_size = key_cache.shape[:2]
                out = self._fia(key=key_cache.view(num_blocks, block_size, -1),
                                value=value_cache.view(num_blocks, block_size, -1),
                                block_table=meta.block_tables.to(torch.int32),
                                block_size=block_size, actual_seq_lengths_kv=seq_lens, **common)
        except RuntimeError as exc:
            self._give_up("prefill", exc)
            return super().prefill(query, key, value, key_cache, value_cache, meta, scale)
        return out.view(-1, num_heads, head_dim)

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               meta: DecodeMetadata, scale: float) -> torch.Tensor:
        if not self.uses_fused("decode", query.dtype):
            return super().decode(query, key_cache, value_cache, meta, scale)
        batch, num_heads, head_dim = query.shape
        num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
        try:
            out = self._fia(query=query.reshape(batch, 1, num_heads * head_dim),
                            key=key_cache.view(num_blocks, block_size, -1),
                            value=value_cache.view(num_blocks, block_size, -1),
                            block_table=meta.block_tables.to(torch.int32), block_size=block_size,
                            actual_seq_lengths_kv=self._decode_lens(meta), num_heads=num_heads,
                            num_key_value_heads=num_kv_heads, input_layout="BSH", scale=scale)
        except RuntimeError as exc:
            self._give_up("decode", exc)
            return super().decode(query, key_cache, value_cache, meta, scale)
        return out.view(batch, num_heads, head_dim)
