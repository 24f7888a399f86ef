"""The Qwen2 family (Qwen2, Qwen2.5): Llama with biases on the query, key and value projections."""

from __future__ import annotations

from sagellm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    attention_features = frozenset({"sliding_window"})
