"""The Ascend KV pool: plain ND tensors in HBM.

``_npu_reshape_and_cache`` and the paged mode of ``npu_fused_infer_attention_score`` read the
pool in the ND layout ``[num_blocks, block_size, kv_heads, head_dim]`` (the fused op sees it as
``[num_blocks, block_size, kv_heads * head_dim]``, a free view), which is exactly the layout of
the contract, so the shared torch pool is used as is; no ``npu_format_cast`` to NZ is done.
"""

from __future__ import annotations

from sagellm.backends.torch_kv import TorchKVBackend


class AscendKVBackend(TorchKVBackend):
    """The shared pool as is: the vendor ops read the contract's layout."""
