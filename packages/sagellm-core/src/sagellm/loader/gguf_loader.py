"""GGUF files: weights through the ``gguf`` package, config and tokenizer through transformers.

The first load of a file converts it into an HF directory in the cache (``config.json``, tokenizer
files, fp32 ``model.safetensors`` of the dequantized weights; see ``model_cache`` for how entries
are keyed and published); later loads, from any copy of the file, read that directory,
which takes a fraction of the time. The same directory is what reference tests load into
transformers, so both sides see identical dequantized weights.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.loader import model_cache
from sagellm.loader.gguf_header import read_layout

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
}
#: GGUF ``general.architecture`` (as transformers names the model type) -> our architecture.
#: Gemma 2/3 and Phi-3 GGUF files are not mapped yet: llama.cpp stores Gemma's norms as
#: ``1 + w`` and Phi-3's fused projections in its own layout, which need checking against
#: real files first.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base not in _GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the rotary row interleaving llama.cpp applies to Llama q/k projections."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: Path, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    permute = config.get("model_type") == "llama"
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = arr.reshape(shape)
        name = hf_name(t.name)
        if permute and name.endswith("q_proj.weight"):
            arr = _unpermute(arr, config["num_attention_heads"])
        elif permute and name.endswith("k_proj.weight"):
            arr = _unpermute(arr, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.ascontiguousarray(arr))


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr, shown on a terminal or with ``-v`` (never in a captured log)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() or logger.isEnabledFor(logging.INFO)
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not show,
                leave=False)


def gguf_to_hf_dir(path: str | Path) -> Path:
    """Convert (once) a GGUF file into a cached HF directory and return that directory.

    The cache is keyed by the file's content (``model_cache``), so every copy of one file, in any
    environment, maps to the same directory; concurrent callers convert it once.
    """
    path = Path(path)
    key = model_cache.content_key(path)
    out = model_cache.entry_dir(key)
    if model_cache.is_complete(out):
        return out
    with model_cache.conversion_lock(key):
        if model_cache.is_complete(out):  # another process converted it while we waited
            return out
        logger.info("converting %s into %s (first load only)", path.name, out)
        tmp = model_cache.staging_dir(key)
        try:
            _convert(path, tmp, read_layout(path).num_tensors)
            return model_cache.publish(tmp, key, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _convert(path: Path, tmp: Path, num_tensors: int) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Steps: config, tokenizer, one per tensor, the safetensors write.
    with _progress(num_tensors + 3, f"converting {path.name} (first load only)") as bar:
        bar.set_postfix_str("config")
        cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        model_type = cfg.pop("model_type")
        cfg.pop("_model_name_or_path", None)
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        arch = GGUF_ARCHITECTURES.get(model_type)
        if arch is None:
            raise ValueError(f"GGUF architecture {model_type!r} is not supported")
        hf_cfg.architectures = [arch]
        hf_cfg.dtype = "float32"
        bar.update(1)
        bar.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(tmp)
        bar.update(1)
        bar.set_postfix_str("weights")
        tensors = {}
        for name, tensor in iter_gguf_tensors(path, {"model_type": model_type, **cfg}):
            tensors[name] = tensor
            bar.update(1)
        if cfg.get("tie_word_embeddings") or "lm_head.weight" not in tensors:
            tensors.pop("lm_head.weight", None)
            hf_cfg.tie_word_embeddings = True
        hf_cfg.save_pretrained(tmp)
        bar.set_postfix_str("writing")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        bar.update(1)
