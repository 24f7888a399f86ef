"""The MLU KV pool, stored in the layout of Cambricon's paged-attention ops.

torch_mlu_ops (``reshape_paged_cache``, ``single_query_cached_kv_attn``) document the paged cache
as ``[num_blocks, kv_heads, block_size, head_dim]``. The pool is allocated that way and
:meth:`kv_caches` hands out ``transpose(1, 2)`` views, which have the contract's shape
``[num_blocks, block_size, kv_heads, head_dim]`` without copying. Attention transposes back to
reach the contiguous native tensor; code that only indexes the views (the reference attention,
KV transfer) works unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.protocols import KVBackend, KVCacheSpec


class MluKVBackend(TorchKVBackend):
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        KVBackend.__init__(self, spec, num_blocks, device)  # not TorchKVBackend's allocation
        shape = (num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        self._native = [
            (torch.zeros(shape, dtype=spec.dtype, device=device),
             torch.zeros(shape, dtype=spec.dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        self._caches = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self._native]
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)

    def native_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)`` in the vendor layout ``[blocks, kv_heads, block_size, dim]``."""
        return self._native

    def copy_blocks(self, src_to_dst: Sequence[tuple[int, int]]) -> None:
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in src_to_dst], dtype=torch.long, device=self.device)
        for k, v in self._native:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
