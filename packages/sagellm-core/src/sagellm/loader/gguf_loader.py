"""GGUF files: weights and config through the ``gguf`` package (``gguf_arch`` maps each
architecture), the tokenizer through transformers.

The first load of a file converts it into an HF directory in the cache (``config.json``, tokenizer
files, fp32 ``model.safetensors`` of the dequantized weights; see ``model_cache`` for how entries
are keyed and published); later loads, from any copy of the file, read that directory,
which takes a fraction of the time. The same directory is what reference tests load into
transformers, so both sides see identical dequantized weights.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.loader import gguf_arch, model_cache
from sagellm.loader.gguf_arch import GGUF_ARCHITECTURES, _unpermute  # noqa: F401 (gguf_blocks)
from sagellm.loader.gguf_header import read_layout

logger = logging.getLogger(__name__)

#: Phi-3's long-rope factors, stored as tensors by llama.cpp: read into the config instead.
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long", "rope_factors_short.weight": "short"}


def hf_name(gguf_name: str) -> str:
    """The transformers name of a Llama-family GGUF tensor (``gguf_arch.hf_name``)."""
    return gguf_arch.hf_name(GGUF_ARCHITECTURES["llama"], gguf_name)


def _array(t: Any) -> np.ndarray:
    """One GGUF tensor, dequantized to float32, in transformers' dimension order."""
    import gguf

    arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    return arr.reshape(tuple(int(x) for x in reversed(t.shape)))


def read_gguf(path: Path) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """The transformers config of a GGUF file and its checkpoint tensors (lazily dequantized);
    ValueError naming the architecture when it is not one sageLLM maps (``gguf_arch``)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = gguf_arch.GGUFMetadata(reader.fields)
    family = gguf_arch.resolve(meta)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    factors = {kind: _array(t).reshape(-1).tolist() for t in reader.tensors
               if (kind := ROPE_FACTOR_TENSORS.get(t.name))}
    cfg = gguf_arch.hf_config(meta, family, shapes, factors)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            if t.name in ROPE_FACTOR_TENSORS:
                continue  # in the config already
            for name, arr in gguf_arch.hf_tensors(family, t.name, _array(t), cfg):
                yield name, torch.from_numpy(np.ascontiguousarray(arr))

    return cfg, tensors()


def iter_gguf_tensors(path: Path, config: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of a GGUF file (``config`` is unused: the file says it all)."""
    return read_gguf(path)[1]


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
    from transformers import AutoConfig

    # Steps: config, tokenizer, one per tensor, the safetensors write.
    with _progress(num_tensors + 3, f"converting {path.name} (first load only)") as bar:
        bar.set_postfix_str("config")
        cfg, tensors_iter = read_gguf(path)
        fields = dict(cfg)
        model_type = fields.pop("model_type")
        hf_cfg = AutoConfig.for_model(model_type, **fields)
        hf_cfg.dtype = "float32"
        bar.update(1)
        bar.set_postfix_str("tokenizer")
        _save_tokenizer(path, tmp)
        bar.update(1)
        bar.set_postfix_str("weights")
        tensors = {}
        for name, tensor in tensors_iter:
            tensors[name] = tensor
            bar.update(1)
        if hf_cfg.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        hf_cfg.save_pretrained(tmp)
        bar.set_postfix_str("writing")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        bar.update(1)


def _save_tokenizer(path: Path, out: Path) -> None:
    """The file's tokenizer, through transformers; a file without one (``tokenizer.ggml.model``
    absent: test files, bare weights) converts without, for token-id prompts only."""
    from transformers import AutoTokenizer

    from sagellm.loader.gguf_header import has_metadata_key

    if not has_metadata_key(path, b"tokenizer.ggml.model"):
        logger.warning("%s has no tokenizer: token-id prompts only", path.name)
        return
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
