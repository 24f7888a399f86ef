"""The one free list of every KV pool, and the hooks that let a backend keep it."""

from __future__ import annotations

import pytest
import torch

from sagellm.backends.free_list import BlockFreeList
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.protocols import KVCacheSpec, KVPoolExhausted

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def test_allocate_is_fifo_and_all_or_nothing() -> None:
    fl = BlockFreeList(4)
    assert fl.allocate(2) == [0, 1] and fl.num_free == 2
    with pytest.raises(KVPoolExhausted, match="asked for 3 KV blocks, 2 are free"):
        fl.allocate(3)
    assert fl.num_free == 2
    fl.free([0])
    assert fl.allocate(3) == [2, 3, 0]  # a freed id is reused last
    assert fl.num_free == 0 and fl.allocate(0) == []


@pytest.mark.parametrize("bad", [[5], [-1], [1, 1]])
def test_foreign_ids_and_double_frees_are_caught(bad: list[int]) -> None:
    fl = BlockFreeList(4, what="prefill KV block")
    fl.allocate(2)
    with pytest.raises(ValueError, match="prefill KV block .* is not allocated"):
        fl.free(bad)


class _TransposedPool(TorchKVBackend):
    """A backend with its own storage layout, as the MLU one: only the allocation differs."""

    def allocate_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        shape = (self.num_blocks, s.num_kv_heads, s.block_size, s.head_dim)
        self.native = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(s.num_layers)]
        return [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self.native]


@pytest.mark.parametrize("cls", [TorchKVBackend, _TransposedPool])
def test_a_backend_with_its_own_layout_keeps_the_shared_free_list(cls: type[TorchKVBackend]) -> None:
    kv = cls(SPEC, 4, torch.device("cpu"))
    assert isinstance(kv._free_list, BlockFreeList)
    k, _ = kv.kv_caches()[1]
    assert k.shape == (4, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    ids = kv.allocate_blocks(3)
    assert kv.get_memory_usage().num_free_blocks == kv.num_free_blocks == 1
    kv.free_blocks(ids)
    with pytest.raises(ValueError, match="KV block .* is not allocated"):
        kv.free_blocks([ids[0]])
