"""The Qwen2 family (Qwen2, Qwen2.5): Llama with biases on the query, key and value projections."""

from __future__ import annotations

from sagellm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True

    def __init__(self, config, tp=None):  # type: ignore[no-untyped-def]
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention is not supported")
        from sagellm.layers.parallel import SINGLE

        super().__init__(config, tp or SINGLE)
