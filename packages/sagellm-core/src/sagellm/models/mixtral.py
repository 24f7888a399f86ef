"""Mixtral: Mistral's attention (Llama's block) with a sparse mixture-of-experts MLP."""

from __future__ import annotations

from torch import nn

from sagellm.layers.moe import SparseMoEBlock, check_moe_config
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from sagellm.models.moe_loading import MoEWeightLoading


class MixtralForCausalLM(MoEWeightLoading, LlamaForCausalLM):
    renames = {".block_sparse_moe.": ".mlp."}

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:  # type: ignore[no-untyped-def]
        check_moe_config(config.num_local_experts, config.num_experts_per_tok)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise ValueError(f"Mixtral sliding-window attention (sliding_window={window}) is not "
                             f"supported")
        super().__init__(config, tp)

    def make_layer(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        moe = SparseMoEBlock(config.hidden_size, config.intermediate_size,
                             config.num_local_experts, config.num_experts_per_tok,
                             renormalize=True, tp=tp)
        return LlamaDecoderLayer(config, layer_idx, tp, self.qkv_bias, mlp=moe)
