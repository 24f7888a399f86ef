"""The paged KV pool in device memory: one allocation for every layer, keys and values.

A single tensor ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` backs all layers, so
copying blocks (copy-on-write, defragmentation) is one indexed copy over every layer at once
instead of two per layer. The per-layer views handed to attention never change address, as CUDA
graphs require.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.protocols import KVBackend, KVCacheSpec


class CudaKVBackend(TorchKVBackend):
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        # Skip TorchKVBackend's per-layer allocation; keep its free list and checks.
        KVBackend.__init__(self, spec, num_blocks, device)
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.pool = torch.zeros(shape, dtype=spec.dtype, device=device)
        self._caches = [(self.pool[i, 0], self.pool[i, 1]) for i in range(spec.num_layers)]
        from collections import deque

        self._free = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)

    def copy_blocks(self, src_to_dst: Sequence[tuple[int, int]]) -> None:
        if not src_to_dst:
            return
        idx = torch.tensor(src_to_dst, dtype=torch.long).to(self.device, non_blocking=True)
        self.pool[:, :, idx[:, 1]] = self.pool[:, :, idx[:, 0]]

    @property
    def bytes_total(self) -> int:
        return self.pool.numel() * self.pool.element_size()
