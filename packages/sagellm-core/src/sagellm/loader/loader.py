"""Turn an ``EngineConfig`` into a model with weights on the platform's device, and a tokenizer."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sagellm.config import EngineConfig
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.loader.default_model import default_model_path
from sagellm.models import resolve_model_class
from sagellm.quant.int4_checkpoints import dequantized_weights, read_int4_format

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: object
    tokenizer: object | None
    model_dir: Path
    source: str
    dtype: torch.dtype
    load_seconds: float


def resolve_model_path(model: str | None, revision: str | None = None,
                       load_format: str = "auto") -> Path:
    """A local directory or .gguf file for ``model``: a path as given, a Hugging Face Hub repo id
    through the Hub's cache (:mod:`sagellm.loader.hub`), or the embedded default when ``None``."""
    if not model:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from sagellm.loader import hub

    if hub.is_repo_id(model):
        return hub.download_model(model, revision, load_format)
    raise FileNotFoundError(f"model {model!r} not found: give a local HF directory, a .gguf file "
                            f"or a Hugging Face Hub repo id (owner/name)")


def resolve_dtype(name: str, default: torch.dtype, hf_config: object | None = None) -> torch.dtype:
    if name == "auto":
        return default
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in ``model_dir``: ``*.safetensors``, else PyTorch ``*.bin``."""
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if files:
        return iter_safetensors(files)
    bins = sorted(glob.glob(str(model_dir / "*.bin")))
    if bins:
        return iter_torch_bin(bins)
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {model_dir} (use "
                            f"load_format='dummy' for random weights)")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt", device="cpu") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def iter_torch_bin(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """PyTorch pickles, read with ``weights_only=True``: tensors and plain containers only, so a
    checkpoint cannot run code on load; anything else is refused with the file named."""
    import pickle

    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise ValueError(
                f"{f} is not a plain PyTorch state dict (torch.load with weights_only=True "
                f"refused it: {str(exc).splitlines()[0]}); sageLLM does not unpickle arbitrary "
                f"objects. Convert the checkpoint to safetensors.") from exc
        if not isinstance(state, dict):
            raise ValueError(f"{f} holds a {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                yield name, tensor


def checkpoint_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_checkpoint` as float tensors: an FP8 or a GPTQ/AWQ/compressed-tensors 4-bit
    checkpoint's weights dequantized (the fp8 and int4 schemes read or repack them as stored,
    :mod:`sagellm.quant.apply`)."""
    from sagellm.quant.fp8_checkpoint import dequantized, read_fp8_format

    weights = iter_checkpoint(model_dir)
    fp8 = read_fp8_format(model_dir)
    if fp8 is not None:
        return dequantized(weights, fp8)
    int4 = read_int4_format(model_dir)
    return weights if int4 is None else dequantized_weights(weights, int4)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights (normal, std 0.02; norms at 1) so benchmarks do realistic work."""
    gen_device = next(model.parameters()).device
    g = torch.Generator(device=gen_device)
    g.manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(config: EngineConfig, device: torch.device, default_dtype: torch.dtype,
               tp: TPGroup = SINGLE, load_tokenizer: bool = True) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    path = resolve_model_path(config.model, config.revision, config.load_format)
    fmt = config.load_format
    source = str(path)
    if path.is_file():
        if path.suffix != ".gguf" and fmt != "gguf":
            raise ValueError(f"{path} is a file but not a .gguf file")
        from sagellm.loader.gguf_loader import gguf_to_hf_dir

        model_dir = gguf_to_hf_dir(path)
        if fmt == "auto":
            fmt = "safetensors"
    else:
        model_dir = path
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{model_dir} has no config.json")
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    dtype = resolve_dtype(config.dtype, default_dtype, hf_config)
    cls = resolve_model_class(hf_config)
    with torch.device(device), _default_dtype(dtype):
        model = cls(hf_config, tp)
    if fmt == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        loaded = model.load_weights(checkpoint_weights(model_dir))  # type: ignore[operator]
        missing = {n for n, _ in model.named_parameters()} - loaded
        if getattr(model, "tie_word_embeddings", False):
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. "
                             f"{sorted(missing)[:3]}")
    model.eval()
    tokenizer = None
    if load_tokenizer:
        tok_dir = Path(config.tokenizer) if config.tokenizer else model_dir
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError) as exc:
            if config.tokenizer:
                raise
            logger.warning("no tokenizer in %s (%s): token-id prompts only", tok_dir, exc)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return LoadedModel(model, hf_config, tokenizer, model_dir, source, dtype,
                       time.perf_counter() - t0)
