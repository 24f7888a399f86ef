"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with sparse mixture-of-experts MLPs.

A layer is sparse unless it is listed in ``mlp_only_layers`` or ``(layer + 1)`` is not a
multiple of ``decoder_sparse_step``; dense layers use the gated MLP of ``intermediate_size``.
Chosen experts' weights are renormalised only with ``norm_topk_prob``.
"""

from __future__ import annotations

from torch import nn

from sagellm.layers.moe import SparseMoEBlock, check_moe_config
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.models.moe_loading import MoEWeightLoading
from sagellm.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(config, layer_idx: int) -> bool:  # type: ignore[no-untyped-def]
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (config.num_experts > 0 and layer_idx not in (getattr(config, "mlp_only_layers", None)
                                                          or []) and (layer_idx + 1) % step == 0)


class Qwen3MoeForCausalLM(MoEWeightLoading, Qwen3ForCausalLM):
    def __init__(self, config, tp: TPGroup = SINGLE) -> None:  # type: ignore[no-untyped-def]
        if any(is_sparse_layer(config, i) for i in range(config.num_hidden_layers)):
            check_moe_config(config.num_experts, config.num_experts_per_tok)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        super().__init__(config, tp)

    def make_mlp(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        if not is_sparse_layer(config, layer_idx):
            return super().make_mlp(config, layer_idx, tp)
        return SparseMoEBlock(config.hidden_size, config.moe_intermediate_size,
                              config.num_experts, config.num_experts_per_tok,
                              renormalize=bool(getattr(config, "norm_topk_prob", False)), tp=tp)
