"""The Gemma 2 family: Llama-like attention with soft-capped scores, local (sliding-window) and
global layers alternating, a GeGLU MLP, norms before and after both sub-blocks, ``(1 + w)``
RMSNorms, embeddings scaled by ``sqrt(hidden)`` and soft-capped final logits."""

from __future__ import annotations

import torch
from torch import nn

from sagellm.layers.attention import ForwardContext
from sagellm.layers.norm import GemmaRMSNorm
from sagellm.layers.parallel import TPGroup
from sagellm.models.llama import LlamaAttention, LlamaForCausalLM


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``; ``x`` unchanged when ``cap`` is ``None``."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaDecoderLayer(nn.Module):
    """``x + post_attn_norm(attn(norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``.

    The residual adds are fused into the next norm, as in Llama's layer: a layer returns its
    MLP output and the residual stream it has not yet been added to.
    """

    def __init__(self, config, attention: nn.Module, mlp: nn.Module) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, ctx))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_cls = GemmaRMSNorm
    attention_features = frozenset({"sliding_window", "logits_soft_cap"})

    def __init__(self, config, tp=None):  # type: ignore[no-untyped-def]
        from sagellm.layers.parallel import SINGLE

        super().__init__(config, tp or SINGLE)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def attention_scale(self, config) -> float:  # type: ignore[no-untyped-def]
        return float(config.query_pre_attn_scalar) ** -0.5

    def make_attention(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return LlamaAttention(config, layer_idx, tp, False, scale=self.attention_scale(config),
                              logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    def make_layer(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return GemmaDecoderLayer(config, self.make_attention(config, layer_idx, tp),
                                 self.make_mlp(config, layer_idx, tp))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # The normaliser is rounded to the activations' dtype first, as the checkpoints expect.
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(super().compute_logits(hidden), self.final_logit_softcapping)
