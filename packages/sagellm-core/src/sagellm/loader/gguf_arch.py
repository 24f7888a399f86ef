"""How each GGUF architecture, as llama.cpp writes it, maps onto a transformers config and
checkpoint: metadata keys to config fields, tensor names to parameter names, and the
conventions llama.cpp's converter applies (reversed here).

* ``llama``: rotary rows of q/k permuted (``_unpermute``). Mistral and Mixtral are written as
  ``llama`` too: a ``sliding_window`` key makes it Mistral, experts (``expert_count``, stacked
  ``ffn_{gate,up,down}_exps``) make it Mixtral.
* ``qwen2``, ``qwen3`` (per-head ``attn_q_norm``/``attn_k_norm``), ``qwen3moe`` (experts in every
  layer, top-k weights renormalised unless ``expert_weights_norm`` says otherwise, as llama.cpp).
* ``gemma2``, ``gemma3``: every norm weight stored as ``1 + w`` (Gemma's RMSNorm scales by
  ``1 + w``); local layers by llama.cpp's fixed pattern (Gemma 2: every other layer from the
  first; Gemma 3: five local to one global) unless ``attention.sliding_window_pattern`` is given;
  the query scale is ``head_dim`` except for the 27B shapes, where llama.cpp uses
  ``hidden / heads``; Gemma 3's local rotary base ``rope.freq_base_swa`` (10000 if absent).
* ``phi3``: fused ``attn_qkv`` and ``ffn_up`` (gate then up) kept fused, long-rope factors read
  from the ``rope_factors_long``/``rope_factors_short`` tensors.

Any other architecture is refused, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GEMMA_LAYER = {**_LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_PHI3_LAYER = {**_LLAMA_LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
#: Stacked expert tensors [experts, out, in] -> index into a family's (gate, up, down) names.
_EXPERTS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF ``general.architecture`` as a transformers family."""

    model_type: str
    architecture: str
    layer_names: dict[str, str]
    #: The MoE block's prefix and its per-expert (gate, up, down) names, for families with experts.
    moe: tuple[str, tuple[str, str, str]] | None = None
    permute_qk: bool = False
    #: llama.cpp stores Gemma's norm weights as ``1 + w``.
    norm_offset: float = 0.0
    extra_config: dict[str, Any] = field(default_factory=dict)


_MIXTRAL_MOE = ("block_sparse_moe", ("w1", "w3", "w2"))
_QWEN_MOE = ("mlp", ("gate_proj", "up_proj", "down_proj"))

#: GGUF architecture -> family. ``llama`` may become Mistral or Mixtral (:func:`resolve`).
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", _LLAMA_LAYER, permute_qk=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", _LLAMA_LAYER),
    "qwen3moe": GGUFArch("qwen3_moe", "Qwen3MoeForCausalLM", _LLAMA_LAYER, moe=_QWEN_MOE,
                         extra_config=dict(decoder_sparse_step=1, mlp_only_layers=[])),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", _GEMMA_LAYER, norm_offset=1.0),
    "gemma3": GGUFArch("gemma3_text", "Gemma3ForCausalLM", _GEMMA_LAYER, norm_offset=1.0),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM", _PHI3_LAYER),
}
_MISTRAL = GGUFArch("mistral", "MistralForCausalLM", _LLAMA_LAYER, permute_qk=True)
_MIXTRAL = GGUFArch("mixtral", "MixtralForCausalLM", _LLAMA_LAYER, moe=_MIXTRAL_MOE,
                    permute_qk=True)


class GGUFMetadata:
    """The key/value metadata of a GGUF file (``gguf.GGUFReader.fields``), typed reads."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key.replace("{arch}", getattr(self, "arch", "")))
        if f is None:
            return default
        value = f.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def has(self, key: str) -> bool:
        return key.replace("{arch}", self.arch) in self.fields


def resolve(meta: GGUFMetadata) -> GGUFArch:
    """The family of ``meta``'s architecture; ValueError naming it when it is not mapped."""
    arch = meta.arch
    if arch == "llama":
        if meta.get("{arch}.expert_count", 0):
            return _MIXTRAL
        if meta.has("{arch}.attention.sliding_window"):
            return _MISTRAL
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (llama also covers Mistral and Mixtral)")
    return GGUF_ARCHITECTURES[arch]


def hf_config(meta: GGUFMetadata, family: GGUFArch, tensor_shapes: dict[str, tuple[int, ...]],
              rope_factors: dict[str, list[float]]) -> dict[str, Any]:
    """transformers config fields of the file (``tensor_shapes`` in transformers' order)."""
    g = meta.get
    heads = int(g("{arch}.attention.head_count"))
    hidden = int(g("{arch}.embedding_length"))
    head_dim = int(g("{arch}.attention.key_length", 0) or g("{arch}.rope.dimension_count", 0)
                   or hidden // heads)
    if family.model_type == "phi3":  # rope.dimension_count is the rotary part (Phi-4-mini)
        head_dim = int(g("{arch}.attention.key_length", 0) or hidden // heads)
    layers = int(g("{arch}.block_count"))
    cfg: dict[str, Any] = dict(
        model_type=family.model_type, architectures=[family.architecture],
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(g("{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim, intermediate_size=int(g("{arch}.feed_forward_length", 0)),
        max_position_embeddings=int(g("{arch}.context_length", 2048)),
        rms_norm_eps=float(g("{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        vocab_size=int(g("{arch}.vocab_size", 0) or tensor_shapes["token_embd.weight"][0]),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        **family.extra_config,
    )
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                      ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                      ("tokenizer.ggml.padding_token_id", "pad_token_id"),
                      ("tokenizer.ggml.unknown_token_id", "unk_token_id")):
        if meta.has(key):
            cfg[name] = int(g(key))
    theta = float(g("{arch}.rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if meta.has("{arch}.attention.sliding_window"):
        cfg["sliding_window"] = int(g("{arch}.attention.sliding_window"))
        cfg["use_sliding_window"] = True
    if family.moe is not None:
        experts = int(g("{arch}.expert_count"))
        used = int(g("{arch}.expert_used_count"))
        if family.model_type == "mixtral":
            cfg.update(num_local_experts=experts, num_experts_per_tok=used)
        else:
            ff = int(g("{arch}.expert_feed_forward_length", 0)
                     or tensor_shapes["blk.0.ffn_gate_exps.weight"][1])
            cfg.update(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=ff,
                       norm_topk_prob=bool(g("{arch}.expert_weights_norm", True)))
    if family.model_type in ("gemma2", "gemma3_text"):
        _gemma(meta, cfg, layers, hidden, heads, head_dim, rope)
    else:
        cfg["rope_parameters"] = rope
    if family.model_type == "phi3":
        rotary = int(g("{arch}.rope.dimension_count", head_dim))
        rope["partial_rotary_factor"] = rotary / head_dim
        if rope_factors:
            rope.update(rope_type="longrope", long_factor=rope_factors["long"],
                        short_factor=rope_factors["short"],
                        original_max_position_embeddings=int(
                            g("{arch}.rope.scaling.original_context_length")))
            cfg["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return cfg


#: Layer counts of the 27B Gemma shapes, whose query scale llama.cpp takes as hidden / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma(meta: GGUFMetadata, cfg: dict[str, Any], layers: int, hidden: int, heads: int,
           head_dim: int, rope: dict[str, Any]) -> None:
    g = meta.get
    arch = meta.arch
    pattern = g("{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        local = [bool(x) for x in pattern]
    else:
        every = int(pattern) if pattern else (2 if arch == "gemma2" else 6)
        local = [(i + 1) % every != 0 for i in range(layers)]
    cfg["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
    big = layers == _GEMMA_27B_LAYERS.get(arch)
    cfg["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = g("{arch}.attn_logit_softcapping")
        cfg["final_logit_softcapping"] = g("{arch}.final_logit_softcapping")
        cfg["rope_parameters"] = rope
        return
    full = dict(rope)
    if str(g("{arch}.rope.scaling.type", "none")) == "linear":
        full.update(rope_type="linear", factor=float(g("{arch}.rope.scaling.factor")))
    local_rope = {"rope_type": "default",
                  "rope_theta": float(g("{arch}.rope.freq_base_swa", 10000.0))}
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local_rope}


def hf_name(family: GGUFArch, gguf_name: str) -> str:
    """The transformers name of a dense (non-expert) GGUF tensor of ``family``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None:
        base, _, kind = gguf_name.rpartition(".")
        if base not in _GLOBAL:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not supported for {family.model_type}")
        return f"{_GLOBAL[base]}.{kind}"
    layer, part, kind = m.groups()
    if part not in family.layer_names:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not supported for {family.model_type}")
    return f"model.layers.{layer}.{family.layer_names[part]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the rotary row interleaving llama.cpp applies to Llama q/k projections."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(family: GGUFArch, gguf_name: str, arr: np.ndarray, cfg: dict[str, Any]
               ) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors (transformers names) of one GGUF tensor ``arr`` (already in
    transformers' shape order); ValueError naming a tensor that has no place in the family."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is not None and family.moe is not None and (m[2] in _EXPERTS or m[2] == "ffn_gate_inp"):
        layer, part, kind = m.groups()
        block, names = family.moe
        prefix = f"model.layers.{layer}.{block}"
        if part == "ffn_gate_inp":
            yield f"{prefix}.gate.{kind}", arr
            return
        for e in range(arr.shape[0]):  # views: the experts stay one array
            yield f"{prefix}.experts.{e}.{names[_EXPERTS[part]]}.{kind}", arr[e]
        return
    name = hf_name(family, gguf_name)
    part = m[2] if m is not None else gguf_name.rpartition(".")[0]
    if family.norm_offset and part.endswith("norm"):
        arr = arr - family.norm_offset
    if family.permute_qk and part == "attn_q":
        arr = _unpermute(arr, cfg["num_attention_heads"])
    elif family.permute_qk and part == "attn_k":
        arr = _unpermute(arr, cfg["num_key_value_heads"])
    yield name, arr
