"""Write a tiny transformers checkpoint as a GGUF file the way llama.cpp's converter does, with
the ``gguf`` package's own tensor-name map (``gguf.get_tensor_name_map``), so the loader's
reading of each architecture is checked against an independent writer: q/k rotary rows
permuted for ``llama``, Gemma's norms stored as ``1 + w``, experts stacked into
``ffn_{gate,up,down}_exps``, Phi-3's long-rope factors as tensors. Float32 tensors, no
tokenizer (the engine takes token-id prompts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

#: transformers ``model_type`` -> GGUF architecture (Mistral and Mixtral are written as llama).
GGUF_ARCH_OF = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen3": "qwen3",
                "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3",
                "phi3": "phi3"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
#: Per-expert projection names -> the stacked name ``gguf``'s map knows.
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "gate_proj": "gate_proj",
                "up_proj": "up_proj", "down_proj": "down_proj"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleave each head's rotary halves."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(model_dir: str | Path, path: str | Path) -> Path:
    """Convert the transformers checkpoint in ``model_dir`` into the GGUF file ``path``."""
    import gguf
    from safetensors.numpy import load_file

    cfg: dict[str, Any] = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = GGUF_ARCH_OF[model_type]
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch_enum, layers)
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, cfg, model_type)
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, arr in sorted(state.items()):
        arr = arr.astype(np.float32)
        m = _EXPERT.fullmatch(name)
        if m:
            layer, e, proj = int(m[1]), int(m[2]), _EXPERT_PROJ[m[3]]
            experts.setdefault((layer, proj), {})[e] = arr
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = _permute(arr, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            arr = _permute(arr, cfg["num_key_value_heads"])
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            arr = arr + 1
        w.add_tensor(_gguf_name(names, name), arr)
    for (layer, proj), by_expert in sorted(experts.items()):
        stacked = np.stack([by_expert[e] for e in range(len(by_expert))])
        w.add_tensor(_gguf_name(names, f"model.layers.{layer}.mlp.experts.{proj}.weight"), stacked)
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight",
                         np.asarray(rope[f"{kind}_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _gguf_name(names: Any, hf: str) -> str:
    found = names.get_name(hf, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise KeyError(f"gguf has no name for {hf}")
    return str(found)


def _write_metadata(w: Any, cfg: dict[str, Any], model_type: str) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_bos_token_id(cfg["bos_token_id"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if model_type in ("mixtral", "qwen3_moe"):
        w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if model_type == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    if model_type == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if model_type == "gemma3_text":
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        full, local = rope["full_attention"], rope["sliding_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        if full.get("rope_type") == "linear":
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        return
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
