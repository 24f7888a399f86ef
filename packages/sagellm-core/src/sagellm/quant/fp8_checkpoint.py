"""FP8 checkpoints as publishers ship them, read into :class:`~sagellm.quant.fp8_grid.Fp8Grid`.

Two ``config.json`` ``quantization_config`` dialects, the same tensors next to each fp8
``<linear>.weight``:

* ``quant_method: "fp8"`` (transformers' FP8 / fine-grained FP8): ``weight_scale`` (one value)
  and, with ``activation_scheme: "static"``, ``input_scale``; or, with
  ``weight_block_size: [bn, bk]``, ``weight_scale_inv [ceil(N / bn), ceil(K / bk)]`` (despite
  the name the factor that dequantizes: ``w = q * weight_scale_inv``) and dynamic activations.
* ``quant_method: "compressed-tensors"`` with 8-bit float weights (formats ``float-quantized``,
  ``naive-quantized``): ``weight_scale`` of one value (strategy ``tensor``), ``[N, 1]``
  (``channel``) or ``[ceil(N / bn), ceil(K / bk)]`` (``block``); ``input_scale`` when the
  input activations are static.

Loading is two passes over the files. The model loads :func:`dequantized` weights (float, so
the model is complete on any backend, and ``--quantization none`` runs them so); then, where
the fp8 scheme runs, :func:`checkpoint_fp8_grids` reads the stored fp8 values again and
:func:`fused_fp8_grid` puts each linear's grid together with the linear's own weight loaders, so
the weights that run are the file's own codes and scales, never requantized.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sagellm.layers.linear import RowParallelLinear
from sagellm.quant.fp8_grid import FP8_DTYPE, Fp8Grid, grid_from_blocks

logger = logging.getLogger(__name__)

_SCALES = ("weight_scale", "weight_scale_inv")
#: Per-tensor key/value cache scales (``kv_cache_scheme``): the KV cache stays in the model's
#: dtype, so they are read past.
_KV_SCALES = ("k_scale", "v_scale", "q_scale", "kv_scale")


@dataclass(frozen=True)
class Fp8Format:
    """What ``quantization_config`` says about the stored fp8 weights."""

    method: str                    # "fp8" or "compressed-tensors"
    block: tuple[int, int] | None  # weight_block_size / block_structure
    static_activations: bool


def _block_of(value: object, field: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"quantization_config.{field} must be two positive integers "
                         f"[rows, cols], got {value!r}")
    return int(value[0]), int(value[1])


def _hf_fp8_format(qc: Mapping[str, object]) -> Fp8Format:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme must be dynamic or static, got "
                         f"{scheme!r}")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported: sageLLM runs e4m3 "
                         f"fp8 weights only")
    block = _block_of(qc.get("weight_block_size"), "weight_block_size")
    if block is not None and scheme == "static":
        raise ValueError("quantization_config: weight_block_size with activation_scheme static is "
                         "not a format sageLLM knows (block-wise fp8 has dynamic activations)")
    return Fp8Format("fp8", block, scheme == "static")


def _ct_fp8_format(qc: Mapping[str, object]) -> Fp8Format | None:
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("quantization_config.config_groups must be a non-empty object in a "
                         "compressed-tensors checkpoint")
    found: list[Fp8Format] = []
    for gname, group in groups.items():
        w = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(w, Mapping):
            raise ValueError(f"quantization_config.config_groups.{gname}.weights must be an "
                             f"object, got {w!r}")
        if w.get("type") != "float" or w.get("num_bits") != 8:
            return None  # an integer scheme (4-bit, int8): not this module's
        strategy = w.get("strategy")
        field = f"config_groups.{gname}.weights"
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"quantization_config.{field}.strategy {strategy!r} is not supported "
                             f"for fp8 weights (tensor, channel or block)")
        if w.get("symmetric") is False:
            raise ValueError(f"quantization_config.{field}.symmetric is false: asymmetric fp8 "
                             f"weights are not supported")
        block = _block_of(w.get("block_structure"), f"{field}.block_structure") \
            if strategy == "block" else None
        if strategy == "block" and block is None:
            raise ValueError(f"quantization_config.{field}: strategy block needs block_structure")
        acts = group.get("input_activations")
        static = isinstance(acts, Mapping) and acts.get("dynamic") is False
        if static and (acts.get("strategy") != "tensor" or acts.get("type") != "float"):
            raise ValueError(f"quantization_config.config_groups.{gname}.input_activations: "
                             f"static activations must be one float scale per tensor, got "
                             f"strategy {acts.get('strategy')!r}")
        found.append(Fp8Format("compressed-tensors", block, static))
    if len(set(found)) > 1:
        raise ValueError("quantization_config.config_groups mix fp8 layouts; sageLLM reads one "
                         "fp8 layout per checkpoint")
    return found[0]


def fp8_format(quantization_config: object) -> Fp8Format | None:
    """The fp8 layout ``quantization_config`` describes, ``None`` when it is not an fp8
    checkpoint; ``ValueError`` naming the field when it is one sageLLM cannot read."""
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, Mapping):
        raise ValueError(f"quantization_config must be an object, got "
                         f"{type(quantization_config).__name__}")
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return _hf_fp8_format(quantization_config)
    if method == "compressed-tensors":
        fmt = quantization_config.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            return None
        return _ct_fp8_format(quantization_config)
    return None


def read_fp8_format(model_dir: Path) -> Fp8Format | None:
    """:func:`fp8_format` of ``model_dir/config.json``; ``None`` for anything that is not an
    HF directory."""
    config = model_dir / "config.json"
    if not model_dir.is_dir() or not config.is_file():
        return None
    return fp8_format(json.loads(config.read_text()).get("quantization_config"))


# -- reading the tensors ----------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


def _grid(prefix: str, parts: Mapping[str, torch.Tensor], fmt: Fp8Format) -> Fp8Grid | None:
    """The grid of ``<prefix>.weight`` from its stored tensors (``None``: no group layout fits
    it, e.g. block-wise with a partial last block of inputs)."""
    q = parts["weight"]
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"checkpoint tensor {prefix}.weight is {q.dtype}; sageLLM runs "
                         f"{FP8_DTYPE} fp8 weights only")
    scale = next((parts[s] for s in _SCALES if s in parts), None)
    if scale is None:
        raise ValueError(f"checkpoint tensor {prefix}.weight is fp8 but has no weight_scale or "
                         f"weight_scale_inv")
    n, k = q.shape
    input_scale = parts.get("input_scale") if fmt.static_activations else None
    if input_scale is not None:
        input_scale = input_scale.float().reshape(())
    if scale.numel() == 1 and not (fmt.block and (n > fmt.block[0] or k > fmt.block[1])):
        return Fp8Grid(q, scale.float().reshape(1, 1).expand(n, 1).contiguous(), input_scale)
    if fmt.block is not None:
        return grid_from_blocks(q, scale, fmt.block, input_scale)
    if tuple(scale.shape) in ((n, 1), (n,)):
        return Fp8Grid(q, scale.float().reshape(n, 1), input_scale)
    raise ValueError(f"checkpoint tensor {prefix}.weight_scale is {list(scale.shape)}; a "
                     f"[{n}, {k}] fp8 weight without weight_block_size takes one scale or "
                     f"[{n}, 1]")


def _fp8_tensors(weights: Iterable[tuple[str, torch.Tensor]], fmt: Fp8Format
                 ) -> Iterator[tuple[str, torch.Tensor | Fp8Grid]]:
    """The checkpoint with each fp8 weight and its scales as one ``(<prefix>.weight, grid)``;
    other tensors as they are."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, suffix = _split(name)
        if suffix in _KV_SCALES:
            continue
        if suffix == "weight_zero_point":
            raise ValueError(f"checkpoint tensor {name}: asymmetric fp8 is not supported")
        is_fp8 = suffix == "weight" and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if not (is_fp8 or suffix in _SCALES or suffix == "input_scale"):
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        # Tensors come in name order (input_scale, weight, weight_scale) but may straddle files.
        if "weight" in parts and any(s in parts for s in _SCALES) and (
                "input_scale" in parts or not fmt.static_activations):
            del pending[prefix]
            grid = _grid(prefix, parts, fmt)
            yield f"{prefix}.weight", (grid if grid is not None else
                                       _dequantize_blocks(prefix, parts, fmt))
    for prefix, parts in pending.items():
        if "weight" in parts:
            what = "input_scale (activation_scheme static)" if any(
                s in parts for s in _SCALES) else "weight_scale"
            raise ValueError(f"checkpoint tensor {prefix}.weight is fp8 but the checkpoint has no "
                             f"{prefix}.{what}")
        if any(s in parts for s in _SCALES):
            raise ValueError(f"checkpoint has fp8 scales for {prefix} but no fp8 {prefix}.weight")


def _dequantize_blocks(prefix: str, parts: Mapping[str, torch.Tensor], fmt: Fp8Format
                       ) -> torch.Tensor:
    """Float weight of a block-wise tensor whose inputs are not whole blocks."""
    assert fmt.block is not None
    q, s = parts["weight"], next(parts[x] for x in _SCALES if x in parts)
    bn, bk = fmt.block
    n, k = q.shape
    full = s.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return q.float() * full


def dequantized(weights: Iterable[tuple[str, torch.Tensor]], fmt: Fp8Format
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint with every fp8 weight dequantized to float32 and its scales dropped: what
    the model's float parameters load."""
    for name, t in _fp8_tensors(weights, fmt):
        yield name, t.dequantize() if isinstance(t, Fp8Grid) else t


def checkpoint_fp8_grids(model_dir: Path, fmt: Fp8Format) -> dict[str, Fp8Grid]:
    """Every fp8 linear weight stored in ``model_dir``, by HF tensor name."""
    from sagellm.loader.loader import iter_checkpoint

    return {name: t for name, t in _fp8_tensors(iter_checkpoint(model_dir), fmt)
            if isinstance(t, Fp8Grid)}


def fused_fp8_grid(module: nn.Module, weight: torch.Tensor, parts: list[tuple[str, object]],
                   grids: Mapping[str, Fp8Grid]) -> Fp8Grid | None:
    """This rank's grid of ``module``, put together from the checkpoint grids by the module's
    own weight loader (the same sharding and fusing as for float), on the weight's device;
    ``None`` when a part is missing or the parts' layouts differ."""
    found = [grids.get(n) for n, _ in parts]
    loader = getattr(weight, "weight_loader", None)
    if not found or any(g is None for g in found) or loader is None:
        return None
    n, k = weight.shape
    full_k = found[0].q.shape[1]  # type: ignore[union-attr]
    per_channel = all(g.scale.shape[1] == 1 for g in found)  # type: ignore[union-attr]
    group = full_k if per_channel else found[0].group  # type: ignore[union-attr]
    if not per_channel and (k % group or any(g.group != group for g in found)):  # type: ignore[union-attr]
        return None
    cols = 1 if per_channel else k // group
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty((n, cols), dtype=torch.float32, device=weight.device)
    split_inputs = isinstance(module, RowParallelLinear) and per_channel
    for (_, sid), grid in zip(parts, found):
        assert grid is not None
        loader(q, grid.q, sid)
        if split_inputs:
            scale.copy_(grid.scale)  # one scale per row covers every rank's share of the inputs
        else:
            loader(scale, grid.scale, sid)
    inputs = [g.input_scale for g in found]  # type: ignore[union-attr]
    input_scale = None
    if all(s is not None for s in inputs):
        # Fused projections read one input: the largest scale keeps every part in range.
        input_scale = torch.stack([s.reshape(()) for s in inputs]).amax().to(weight.device)  # type: ignore[union-attr]
    return Fp8Grid(q, scale, input_scale)


def log_dequantized(source: str) -> None:
    logger.info("%s stores fp8 weights; running them dequantized (use --quantization fp8, or "
                "auto on a backend with fast fp8, to run them as stored)", source)
