"""The Llama family (Llama 2 and 3, SmolLM and SmolLM2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sagellm.layers.activation import gated_activation
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
from sagellm.layers.rotary import RotaryEmbedding, make_rotary


def head_dim_of(config) -> int:  # type: ignore[no-untyped-def]
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_type_of(config, layer_idx: int) -> str | None:  # type: ignore[no-untyped-def]
    """``full_attention`` / ``sliding_attention`` from the config's ``layer_types``, if any."""
    types = getattr(config, "layer_types", None)
    return None if types is None else str(types[layer_idx])


def sliding_window_of(config, layer_idx: int) -> int | None:  # type: ignore[no-untyped-def]
    """The sliding window of layer ``layer_idx``, or ``None`` for full attention.

    Configs with ``layer_types`` (Qwen2/3, Gemma 2/3) name each layer ``sliding_attention`` or
    ``full_attention``; older ones (Mistral, Phi-3) give one ``sliding_window`` for all layers.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3 keep a window they don't use
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer_idx] == "sliding_attention" else None
    return window


class LlamaAttention(nn.Module):
    """Self-attention: fused QKV projection, rotary embedding, paged attention, output projection.

    Families change it through the constructor (``scale``, ``logits_soft_cap``, ``rotary``) or
    by overriding :meth:`project` (Qwen3's per-head query/key norms); the sliding window comes
    from the config (:func:`sliding_window_of`).
    """

    def __init__(self, config, layer_idx: int, tp: TPGroup, qkv_bias: bool,  # type: ignore[no-untyped-def]
                 scale: float | None = None, logits_soft_cap: float | None = None,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        d = head_dim_of(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads,
                                          config.num_key_value_heads,
                                          bias=qkv_bias or attention_bias, tp=tp)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size,
                                        bias=attention_bias and not qkv_bias, tp=tp)
        self.rotary = rotary or make_rotary(config, d, layer_type_of(config, layer_idx))
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, d, scale=scale,
                              sliding_window=sliding_window_of(config, layer_idx),
                              logits_soft_cap=logits_soft_cap)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [T, hidden] -> ``q`` [T, H, D], ``k`` and ``v`` [T, Hkv, D], before rotation."""
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim),
                k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    """Gated MLP. Long batches run in row chunks: the ``[tokens, 2 x intermediate]`` activation
    is the largest tensor of a prefill, and chunking it bounds peak memory (more KV blocks) at no
    cost in speed, since chunks of ``chunk_tokens`` rows still saturate the GEMMs."""

    chunk_tokens = 2048

    def __init__(self, config, tp: TPGroup) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp=tp)
        self.act = gated_activation(getattr(config, "hidden_activation", None)
                                    or getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.chunk_tokens
        if n <= c:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        out = torch.empty_like(x)
        for i in range(0, n, c):
            out[i:i + c] = self.down_proj(self.act(self.gate_up_proj(x[i:i + c])))
        return out


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with the residual add
    fused into the norms."""

    def __init__(self, config, attention: nn.Module, mlp: nn.Module) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
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
    #: What a checkpoint of this family may ask of the attention backend (``sliding_window``,
    #: ``logits_soft_cap``), depending on its config; listed by ``sagellm models``.
    attention_features: frozenset[str] = frozenset()
    #: The final norm's class (the layers' norms are the decoder layer's business).
    norm_cls: type[RMSNorm] = RMSNorm
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
        self.layers = nn.ModuleList(self.make_layer(config, i, tp)
                                    for i in range(config.num_hidden_layers))
        self.norm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -- what a family changes -------------------------------------------------------------

    def make_attention(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return LlamaAttention(config, layer_idx, tp, self.qkv_bias)

    def make_mlp(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        return LlamaMLP(config, tp)

    def make_layer(self, config, layer_idx: int, tp: TPGroup) -> nn.Module:  # type: ignore[no-untyped-def]
        """Decoder layer ``layer_idx``; called once per layer by ``__init__``."""
        return LlamaDecoderLayer(config, self.make_attention(config, layer_idx, tp),
                                 self.make_mlp(config, layer_idx, tp))

    def checkpoint_parts(self, name: str, tensor: torch.Tensor
                         ) -> Iterable[tuple[str, torch.Tensor, object]]:
        """A checkpoint tensor (``model.`` prefix removed) as ``(our name, tensor, shard id)``
        parts; packs separate projections into our fused ones (see :attr:`packed`)."""
        for src, (dst, sid) in self.packed.items():
            if f".{src}." in name:
                return [(name.replace(f".{src}.", f".{dst}."), tensor, sid)]
        return [(name, tensor, None)]

    # -- running -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
                ) -> torch.Tensor:
        x = self.embed(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # type: ignore[no-any-return]

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
            for part, t, shard in self.checkpoint_parts(name, tensor):
                param = params.get(part)
                if param is None:
                    raise ValueError(f"checkpoint tensor {part!r} has no place in "
                                     f"{type(self).__name__}")
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(t)
                else:
                    loader(param, t.to(param.dtype), shard)
                loaded.add(part)
        return loaded
