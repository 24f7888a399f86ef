"""GGUF files: weights through the ``gguf`` package, config and tokenizer through transformers.

The first load of a file converts it into an HF directory in the cache (``config.json``, tokenizer
files, fp32 ``model.safetensors`` of the dequantized weights); later loads read that directory,
which takes a fraction of the time. The same directory is what reference tests load into
transformers, so both sides see identical dequantized weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

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
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def cache_root() -> Path:
    return Path(os.environ.get("SAGELLM_CACHE", Path.home() / ".cache" / "sagellm"))


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


def _file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}"


def gguf_to_hf_dir(path: str | Path) -> Path:
    """Convert (once) a GGUF file into a cached HF directory and return that directory."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    out = cache_root() / "gguf" / _file_key(path)
    if (out / "model.safetensors").exists():
        return out
    logger.info("converting %s into %s (first load only)", path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        model_type = cfg.pop("model_type")
        cfg.pop("_model_name_or_path", None)
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(model_type)
        if arch is None:
            raise ValueError(f"GGUF architecture {model_type!r} is not supported")
        hf_cfg.architectures = [arch]
        hf_cfg.torch_dtype = "float32"
        hf_cfg.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(tmp)
        tensors = dict(iter_gguf_tensors(path, {"model_type": model_type, **cfg}))
        if cfg.get("tie_word_embeddings") or "lm_head.weight" not in tensors:
            tensors.pop("lm_head.weight", None)
            hf_cfg.tie_word_embeddings = True
            hf_cfg.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "sagellm_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
