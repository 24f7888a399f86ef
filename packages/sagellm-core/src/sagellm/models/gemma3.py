"""The Gemma 3 text family (``Gemma3ForCausalLM``): Gemma 2's block with per-head query/key
norms instead of score soft-capping, and a rope base (and scaling) of its own for the local
(sliding-window) and the global layers, five local to one global in released checkpoints."""

from __future__ import annotations

from torch import nn

from sagellm.layers.norm import GemmaRMSNorm
from sagellm.layers.parallel import TPGroup
from sagellm.models.gemma2 import Gemma2ForCausalLM
from sagellm.models.qwen3 import Qwen3Attention


class Gemma3Attention(Qwen3Attention):
    norm_cls = GemmaRMSNorm


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def make_attention(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        # The rotary embedding follows the layer type (``rope_parameters`` holds one set each).
        return Gemma3Attention(config, layer_idx, tp, scale=self.attention_scale(config),
                               logits_soft_cap=getattr(config, "attn_logit_softcapping", None))
