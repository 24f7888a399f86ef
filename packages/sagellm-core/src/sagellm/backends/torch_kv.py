"""A KV pool made of plain torch tensors: the base of every backend shipped with sageLLM.

A device backend subclasses :class:`TorchKVBackend` and, at most, overrides ``copy_blocks`` with a
faster kernel; the free list, the checks and the memory report are shared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from sagellm.protocols import KVBackend, KVCacheSpec, KVMemoryUsage, KVPoolExhausted


class TorchKVBackend(KVBackend):
    """Per layer one key and one value tensor ``[num_blocks, block_size, kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        super().__init__(spec, num_blocks, device)
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self._caches = [
            (
                torch.zeros(shape, dtype=spec.dtype, device=device),
                torch.zeros(shape, dtype=spec.dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise KVPoolExhausted(f"asked for {num_blocks} KV blocks, {len(self._free)} are free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        for i in ids:
            self._allocated[i] = 1
        return ids

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        for i in block_ids:
            if not 0 <= i < self.num_blocks or not self._allocated[i]:
                raise ValueError(f"KV block {i} is not allocated")
            self._allocated[i] = 0
            self._free.append(i)

    def copy_blocks(self, src_to_dst: Sequence[tuple[int, int]]) -> None:
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], device=self.device)
        dst = torch.tensor([d for _, d in src_to_dst], device=self.device)
        for k, v in self._caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._caches

    def get_memory_usage(self) -> KVMemoryUsage:
        return KVMemoryUsage(
            num_blocks=self.num_blocks,
            num_free_blocks=len(self._free),
            block_size=self.spec.block_size,
            bytes_total=self.num_blocks * self.spec.bytes_per_block,
        )
