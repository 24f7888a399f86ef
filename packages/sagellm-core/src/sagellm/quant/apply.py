"""Quantizing a loaded model on load: which scheme, from which data, into which linears.

Called once per engine rank by the builder, after the weights load and the layer swap. The
scheme is ``EngineConfig.quantization``: ``none`` keeps the weights as loaded; ``int8`` /
``int4`` need a backend that registers that scheme (``Platform.register_quantizations``) and
are refused otherwise, naming the backend and what it offers; ``auto`` runs a checkpoint from
the scheme it is stored in (a GGUF file of Q4_0/Q4_1 linears runs int4, of Q8_0 int8) where the
backend registers that scheme and says it runs it fast, and everything else as loaded.
``fp8`` is W8A8 fp8; an FP8 checkpoint (:mod:`sagellm.quant.fp8_checkpoint`) is stored ``fp8``.
A GPTQ, AWQ or compressed-tensors 4-bit directory (:mod:`sagellm.quant.int4_checkpoints`) is
stored ``int4``: its float weights load dequantized, and its grids repack from the files.

4-bit GGUF blocks and GPTQ/AWQ grids are repacked from the file's own codes and scales (no
requantization) where the scheme's format takes their group size, an FP8 checkpoint's weights
run from its own fp8 values and scales; every other weight is quantized from its float values
(round to nearest).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sagellm.layers.linear import ParallelLMHead, RowParallelLinear
from sagellm.layers.quant_linear import QUANTIZABLE, QuantizedWeight, quantize_linear
from sagellm.quant.fp8_checkpoint import (
    checkpoint_fp8_grids,
    fused_fp8_grid,
    log_dequantized,
    read_fp8_format,
)
from sagellm.quant.grids import Int4Grid

logger = logging.getLogger(__name__)

SCHEMES = ("auto", "none", "int8", "int4", "fp8")


@dataclass(frozen=True)
class QuantReport:
    scheme: str
    num_linears: int
    #: Of those, packed from the checkpoint's own quantized blocks (the rest: quantized from float).
    num_from_checkpoint: int
    bytes_before: int
    bytes_after: int


def resolve_scheme(requested: str, offered: Mapping[str, type[QuantizedWeight]],
                   backend: str, stored: str | None) -> str:
    """The scheme to run, or ``ValueError`` naming the field and what ``backend`` offers."""
    if requested not in SCHEMES:
        raise ValueError(f"quantization {requested!r} is not a scheme; use one of {', '.join(SCHEMES)}")
    if requested == "none":
        return "none"
    if requested == "auto":
        cls = offered.get(stored) if stored else None
        return stored if cls is not None and cls.runs_fast() else "none"  # type: ignore[return-value]
    if requested not in offered:
        have = ", ".join(["none", *sorted(offered)])
        raise ValueError(f"quantization {requested!r} is not supported by the {backend} backend "
                         f"(it runs: {have})")
    return requested


def checkpoint_grids(source: str, hf_config: object) -> Mapping[str, Int4Grid]:
    """The 4-bit grids stored in ``source`` (a GGUF file, or a GPTQ/AWQ/compressed-tensors
    directory), by HF tensor name; ``{}`` otherwise."""
    path = Path(source)
    fp8 = read_fp8_format(path)
    if fp8 is not None:
        return checkpoint_fp8_grids(path, fp8)  # type: ignore[return-value]
    if path.is_dir():
        from sagellm.quant.int4_checkpoints import StoredGrids, read_int4_format

        fmt = read_int4_format(path)
        return StoredGrids(path, fmt) if fmt is not None else {}
    if path.suffix != ".gguf" or not path.is_file():
        return {}
    from sagellm.quant.gguf_blocks import stored_int4_grids

    return dict(stored_int4_grids(path, hf_config.to_dict()))  # type: ignore[attr-defined]


def stored_scheme_of(source: str) -> str | None:
    path = Path(source)
    if read_fp8_format(path) is not None:
        return "fp8"
    if path.is_dir():
        from sagellm.quant.int4_checkpoints import read_int4_format

        return "int4" if read_int4_format(path) is not None else None
    if path.suffix != ".gguf" or not path.is_file():
        return None
    from sagellm.quant.gguf_blocks import stored_scheme

    return stored_scheme(path)


def _checkpoint_parts(model: nn.Module, name: str) -> list[tuple[str, object]]:
    """The checkpoint tensors (and shard ids) that were loaded into linear ``name``."""
    if name == "lm_head":
        tied = getattr(model, "tie_word_embeddings", False)
        return [("model.embed_tokens.weight" if tied else "lm_head.weight", None)]
    packed: Mapping[str, tuple[str, object]] = getattr(model, "packed", {})
    parts = [(f"model.{name.replace(f'.{dst}', f'.{src}')}.weight", sid)
             for src, (dst, sid) in packed.items() if name.endswith(f".{dst}")]
    return parts or [(f"model.{name}.weight", None)]


def _fused_grid(module: nn.Module, weight: torch.Tensor, parts: list[tuple[str, object]],
                grids: Mapping[str, Int4Grid]) -> Int4Grid | None:
    """This rank's grid of ``module``, put together from the checkpoint grids by the module's
    own weight loader (the same sharding and fusing as for float); ``None`` if one is missing."""
    found = [grids.get(n) for n, _ in parts]
    if not found or any(g is None for g in found):
        return None
    loader = getattr(weight, "weight_loader", None)
    group = found[0].group  # type: ignore[union-attr]
    n, k = weight.shape
    if loader is None or k % group:
        return None
    perm = found[0].perm  # type: ignore[union-attr]
    if any((g.perm is None) != (perm is None) or (perm is not None and not torch.equal(g.perm, perm))  # type: ignore[union-attr]
           for g in found):
        raise ValueError(f"{parts[0][0]}: the checkpoint tensors fused into one linear have "
                         f"different act-order input orders (g_idx)")
    if perm is not None and isinstance(module, RowParallelLinear) and module.tp.size > 1:
        raise ValueError(f"{parts[0][0]}: an act-order (desc_act) weight cannot be split by "
                         f"input across {module.tp.size} tensor-parallel ranks; run it with "
                         f"tensor_parallel_size 1 or a checkpoint without desc_act")
    dev = weight.device
    out = Int4Grid(torch.empty((n, k), dtype=torch.uint8, device=dev),
                   torch.empty((n, k // group), device=dev, dtype=torch.float32),
                   torch.empty((n, k // group), device=dev, dtype=torch.float32),
                   None if perm is None else perm.to(dev))
    for (_, sid), grid in zip(parts, found):
        assert grid is not None
        if grid.group != group:
            return None
        loader(out.codes, grid.codes, sid)
        loader(out.scale, grid.scale, sid)
        loader(out.minimum, grid.minimum, sid)
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, weight_cls: type[QuantizedWeight],
                   grids: Mapping[str, Int4Grid] | None = None,
                   head_cls: type[QuantizedWeight] | None = None) -> QuantReport:
    """Give every quantizable linear of ``model`` a ``weight_cls`` weight, and the LM head a
    ``head_cls`` one (``None``: ``weight_cls`` too)."""
    grids = grids or {}
    num = from_ckpt = before = after = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, QUANTIZABLE):
            continue
        is_head = isinstance(module, ParallelLMHead)
        if is_head and weight_cls.head_scheme == "none":
            continue
        cls = head_cls or weight_cls if is_head else weight_cls
        weight = module.weight
        n, k = weight.shape
        if not cls.supports(n, k):
            logger.info("%s [%d, %d] stays unquantized (%s does not fit it)", name, n, k,
                        cls.scheme)
            continue
        qweight = None
        if grids:
            fuse = fused_fp8_grid if weight_cls.scheme == "fp8" else _fused_grid
            grid = fuse(module, weight, _checkpoint_parts(model, name), grids)  # type: ignore[arg-type]
            qweight = cls.from_grid(grid) if grid is not None else None
        from_ckpt += qweight is not None
        if qweight is None:
            # A head's rows past the vocabulary (TP padding) are zeros and stay so.
            qweight = cls.from_float(weight)
        if isinstance(module, ParallelLMHead):
            qweight.as_lm_head()
        before += weight.numel() * weight.element_size()
        after += qweight.nbytes
        quantize_linear(module, qweight)
        num += 1
    return QuantReport(weight_cls.scheme, num, from_ckpt, before, after)


def apply_quantization(model: nn.Module, requested: str,
                       offered: Mapping[str, type[QuantizedWeight]], backend: str,
                       source: str, hf_config: object) -> QuantReport | None:
    """Resolve ``requested`` and quantize ``model`` in place; ``None`` when it stays as loaded."""
    stored = stored_scheme_of(source) if requested in ("auto", "int4", "fp8") else None
    scheme = resolve_scheme(requested, offered, backend, stored)
    if scheme == "none":
        if read_fp8_format(Path(source)) is not None:
            log_dequantized(source)
        return None
    cls = offered[scheme]
    grids = checkpoint_grids(source, hf_config) if scheme in ("int4", "fp8") and stored == scheme \
        else {}
    head = offered.get(cls.head_scheme) if cls.head_scheme else None
    report = quantize_model(model, cls, grids, head)
    logger.info("%s: %d linears in %s (%d from the checkpoint's blocks), %.0f -> %.0f MB",
                backend, report.num_linears, scheme, report.num_from_checkpoint,
                report.bytes_before / 2**20, report.bytes_after / 2**20)
    return report
