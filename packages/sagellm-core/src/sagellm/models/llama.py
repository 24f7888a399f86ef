"""The Llama family (Llama 2 and 3, SmolLM and SmolLM2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sagellm.layers.activation import SiluAndMul
from sagellm.layers.attention import Attention, ForwardContext
from sagellm.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from sagellm.layers.norm import RMSNorm
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.layers.rotary import RotaryEmbedding, rope_settings


def head_dim_of(config) -> int:  # type: ignore[no-untyped-def]
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup, qkv_bias: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        d = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias, tp=tp)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size,
                                        bias=getattr(config, "attention_bias", False) and not qkv_bias,
                                        tp=tp)
        base, scaling = rope_settings(config)
        self.rotary = RotaryEmbedding(d, config.max_position_embeddings, base, scaling)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, d)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    """Gated MLP. Long batches run in row chunks: the ``[tokens, 2 x intermediate]`` activation
    is the largest tensor of a prefill, and chunking it bounds peak memory (more KV blocks) at no
    cost in speed, since chunks of ``chunk_tokens`` rows still saturate the GEMMs."""

    chunk_tokens = 2048

    def __init__(self, config, tp: TPGroup) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp=tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.chunk_tokens
        if n <= c:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        out = torch.empty_like(x)
        for i in range(0, n, c):
            out[i:i + c] = self.down_proj(self.act(self.gate_up_proj(x[i:i + c])))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup, qkv_bias: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, tp, qkv_bias)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    #: checkpoint name fragment -> (our parameter fragment, shard id)
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.config = config
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, tp, self.qkv_bias) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
                ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the parameter names that were set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            shard: object = None
            for src, (dst, sid) in self.packed.items():
                if f".{src}." in name:
                    name, shard = name.replace(f".{src}.", f".{dst}."), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            else:
                loader(param, tensor.to(param.dtype), shard)
            loaded.add(name)
        return loaded
