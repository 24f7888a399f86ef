"""CudaKVBackend's one-tensor pool (on the CPU: the layout is the same on every device)."""

from __future__ import annotations

import torch

from sagellm.protocols import KVCacheSpec
from sagellm_cuda.kv import CudaKVBackend


def test_every_layer_is_a_fixed_view_of_one_pool() -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
    kv = CudaKVBackend(spec, 5, torch.device("cpu"))
    assert tuple(kv.pool.shape) == (3, 2, 5, 4, 2, 8) and kv.pool.dtype == torch.float16
    caches = kv.kv_caches()
    assert len(caches) == 3
    for i, (k, v) in enumerate(caches):
        assert tuple(k.shape) == tuple(v.shape) == (5, 4, 2, 8)
        assert k.is_contiguous() and v.is_contiguous()  # the Triton kernels require it
        assert k.data_ptr() == kv.pool[i, 0].data_ptr() and v.data_ptr() == kv.pool[i, 1].data_ptr()
    # A write through a layer's view lands in the pool, at that layer's key or value half.
    caches[1][1][2, 3, 1].fill_(7)
    assert kv.pool[1, 1, 2, 3, 1].eq(7).all() and kv.pool.ne(0).sum() == 8
    assert kv.bytes_total == kv.pool.numel() * 2 == 5 * spec.bytes_per_block
    assert kv.get_memory_usage().bytes_total == kv.bytes_total
