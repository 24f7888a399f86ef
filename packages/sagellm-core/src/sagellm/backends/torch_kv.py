"""A KV pool made of plain torch tensors: the base of every backend shipped with sageLLM.

A device backend subclasses :class:`TorchKVBackend` and, at most, overrides
:meth:`~TorchKVBackend.allocate_caches` (another storage layout); the free list
(:class:`~sagellm.backends.free_list.BlockFreeList`), the checks and the memory report are shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sagellm.backends.free_list import BlockFreeList
from sagellm.protocols import KVBackend, KVCacheSpec, KVMemoryUsage


class TorchKVBackend(KVBackend):
    """Per layer one key and one value tensor ``[num_blocks, block_size, kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        super().__init__(spec, num_blocks, device)
        self._caches = self.allocate_caches()
        self._free_list = BlockFreeList(num_blocks)

    def allocate_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Allocate the pool; per layer ``(key, value)`` in the contract's layout.

        Called once, from ``__init__`` (``spec``, ``num_blocks`` and ``device`` are set). A backend
        that stores the pool differently allocates its own tensors here and returns views of them.
        """
        spec = self.spec
        shape = (self.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        return [
            (
                torch.zeros(shape, dtype=spec.dtype, device=self.device),
                torch.zeros(shape, dtype=spec.dtype, device=self.device),
            )
            for _ in range(spec.num_layers)
        ]

    @property
    def num_free_blocks(self) -> int:
        return self._free_list.num_free

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        return self._free_list.allocate(num_blocks)

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        self._free_list.free(block_ids)

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._caches

    def get_memory_usage(self) -> KVMemoryUsage:
        return KVMemoryUsage(
            num_blocks=self.num_blocks,
            num_free_blocks=self._free_list.num_free,
            block_size=self.spec.block_size,
            bytes_total=self.num_blocks * self.spec.bytes_per_block,
        )
