"""The MLU KV pool, stored in the layout of Cambricon's paged-attention ops.

torch_mlu_ops (``reshape_paged_cache``, ``single_query_cached_kv_attn``) document the paged cache
as ``[num_blocks, kv_heads, block_size, head_dim]``. The pool is allocated that way and
:meth:`kv_caches` hands out ``transpose(1, 2)`` views, which have the contract's shape
``[num_blocks, block_size, kv_heads, head_dim]`` without copying. Attention transposes back to
reach the contiguous native tensor; code that only indexes the views (the reference attention,
KV transfer) works unchanged.
"""

from __future__ import annotations

import torch

from sagellm.backends.torch_kv import TorchKVBackend


class MluKVBackend(TorchKVBackend):
    _native: list[tuple[torch.Tensor, torch.Tensor]]

    def allocate_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.spec
        shape = (self.num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        self._native = [
            (torch.zeros(shape, dtype=spec.dtype, device=self.device),
             torch.zeros(shape, dtype=spec.dtype, device=self.device))
            for _ in range(spec.num_layers)
        ]
        return [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self._native]

    def native_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)`` in the vendor layout ``[blocks, kv_heads, block_size, dim]``."""
        return self._native
