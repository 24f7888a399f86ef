"""The Phi-3 family (Phi-3, Phi-3.5-mini, Phi-4, Phi-4-mini): Llama's block with the query, key
and value projections fused in one checkpoint tensor (``qkv_proj``), gate and up fused too
(``gate_up_proj``), long-rope scaling and, for Phi-4-mini, a partial rotary embedding."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sagellm.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    attention_features = frozenset({"sliding_window"})

    def checkpoint_parts(self, name: str, tensor: torch.Tensor
                         ) -> Iterable[tuple[str, torch.Tensor, object]]:
        """Split the fused checkpoint tensors into the parts our tensor-parallel loaders take
        (each rank keeps its own heads of q, k and v, and its own rows of gate and up)."""
        c = self.config
        if ".qkv_proj." in name:
            d = head_dim_of(c)
            sizes = [c.num_attention_heads * d, c.num_key_value_heads * d,
                     c.num_key_value_heads * d]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {sum(sizes)} "
                                 f"(q, k and v heads of {d})")
            return [(name, part, sid)
                    for part, sid in zip(tensor.split(sizes), ("q", "k", "v"), strict=True)]
        if ".gate_up_proj." in name:
            gate, up = tensor.chunk(2)
            return [(name, gate, 0), (name, up, 1)]
        return super().checkpoint_parts(name, tensor)
