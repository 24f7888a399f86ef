"""Mixtral: Mistral's attention (Llama's block, sliding window from the config) with a sparse
mixture-of-experts MLP whose chosen experts' weights are renormalised."""

from __future__ import annotations

from torch import nn

from sagellm.layers.moe import SparseMoEBlock, check_moe_config
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.models.llama import LlamaForCausalLM
from sagellm.models.moe_loading import MoEWeightLoading


class MixtralForCausalLM(MoEWeightLoading, LlamaForCausalLM):
    renames = {".block_sparse_moe.": ".mlp."}
    attention_features = frozenset({"sliding_window"})

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:  # type: ignore[no-untyped-def]
        # Before any layer is built: a refused config allocates nothing.
        check_moe_config(config.num_local_experts, config.num_experts_per_tok)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        super().__init__(config, tp)

    def make_mlp(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return SparseMoEBlock(config.hidden_size, config.intermediate_size,
                              config.num_local_experts, config.num_experts_per_tok,
                              renormalize=True, tp=tp)
