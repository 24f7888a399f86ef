"""The paged KV pool in device memory: one allocation for every layer, keys and values.

A single tensor ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` backs all layers,
so a future block copy (copy-on-write, defragmentation) can be one indexed copy over every layer
instead of two per layer. The per-layer views handed to attention never change address, as CUDA
graphs require.
"""

from __future__ import annotations

import torch

from sagellm.backends.torch_kv import TorchKVBackend


class CudaKVBackend(TorchKVBackend):
    pool: torch.Tensor

    def allocate_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.spec
        shape = (spec.num_layers, 2, self.num_blocks, spec.block_size, spec.num_kv_heads,
                 spec.head_dim)
        self.pool = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        return [(self.pool[i, 0], self.pool[i, 1]) for i in range(spec.num_layers)]

    @property
    def bytes_total(self) -> int:
        return self.pool.numel() * self.pool.element_size()
