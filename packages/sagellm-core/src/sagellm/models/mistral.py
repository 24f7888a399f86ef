"""The Mistral family (Mistral 7B, Mistral-Nemo, Ministral, Mistral-Small): Llama's block, with
the sliding window of ``config.sliding_window`` on every layer when it is set."""

from __future__ import annotations

from sagellm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Nothing to add: :func:`~sagellm.models.llama.sliding_window_of` reads the window."""

    attention_features = frozenset({"sliding_window"})
