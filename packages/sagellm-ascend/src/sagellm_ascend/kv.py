"""The Ascend KV pool: plain ND tensors in HBM.

``_npu_reshape_and_cache`` and the paged mode of ``npu_fused_infer_attention_score`` read the
pool in the ND layout ``[num_blocks, block_size, kv_heads, head_dim]`` (the fused op sees it as
``[num_blocks, block_size, kv_heads * head_dim]``, a free view), which is exactly the layout of
the contract, so the shared torch pool is used as is; no ``npu_format_cast`` to NZ is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sagellm.backends.torch_kv import TorchKVBackend


class AscendKVBackend(TorchKVBackend):
    def copy_blocks(self, src_to_dst: Sequence[tuple[int, int]]) -> None:
        """One ``index_copy_`` per tensor: a single device op instead of an index_put."""
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in src_to_dst], dtype=torch.long, device=self.device)
        for k, v in self.kv_caches():
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
