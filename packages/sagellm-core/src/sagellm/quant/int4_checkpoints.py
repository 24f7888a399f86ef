"""4-bit weight-only checkpoints (GPTQ, AWQ, compressed-tensors ``pack-quantized``) read as
:class:`~sagellm.quant.grids.Int4Grid`, and as float for the model's ordinary load.

The formats, as their libraries write them (``N`` outputs, ``K`` inputs, ``G`` groups):

* GPTQ (``quant_method: gptq``; auto-gptq, gptqmodel, optimum): ``qweight`` int32 ``[K/8, N]``,
  input ``k`` in bits ``4 (k % 8)`` of row ``k // 8``; ``qzeros`` int32 ``[G, N/8]``, output
  ``n`` in bits ``4 (n % 8)``; ``scales`` ``[G, N]``; ``g_idx`` int32 ``[K]``, the group of each
  input (out of order with ``desc_act``). ``w = (q - zero) * scale``, where the v1 layout
  (``checkpoint_format`` ``gptq``, the default) stores ``zero - 1`` and v2 stores ``zero``.
* AWQ (``quant_method: awq``, ``version: gemm``; autoawq): ``qweight`` int32 ``[K, N/8]`` and
  ``qzeros`` ``[G, N/8]`` packed along outputs in AWQ's interleaved order (nibble ``i`` of word
  ``c`` holds output ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``), ``scales`` ``[G, N]``; no offset.
* compressed-tensors ``pack-quantized`` 4-bit ints (llm-compressor): ``weight_packed`` int32
  ``[N, K/8]`` (input ``k`` in bits ``4 (k % 8)``, stored as ``q + 8``), ``weight_scale``
  ``[N, G]``, ``weight_zero_point`` int32 ``[N/8, G]`` packed along outputs (asymmetric only,
  also ``+ 8``), ``weight_g_idx`` ``[K]`` (act-order only), ``weight_shape``.

``group_size`` -1 is one group per output channel. A tensor of the wrong shape or a config
value sageLLM does not run is a ``ValueError`` that names it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sagellm.quant.grids import Int4Grid

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: The tensors of one packed linear, by format: (required, optional) suffixes after ``prefix.``.
PARTS = {
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",)),
    "awq": (("qweight", "qzeros", "scales"), ()),
    "compressed-tensors": (("weight_packed", "weight_scale"),
                           ("weight_zero_point", "weight_g_idx", "weight_shape")),
}


@dataclass(frozen=True)
class Int4Format:
    """A checkpoint's 4-bit weight-only layout, from its ``quantization_config``."""

    method: str          # a key of PARTS
    group: int           # inputs per group; -1: one group per output channel
    sym: bool = False
    #: Added to the stored zero (GPTQ v1 stores ``zero - 1``).
    zero_offset: int = 0

    @property
    def suffixes(self) -> tuple[str, ...]:
        required, optional = PARTS[self.method]
        return required + optional


def _field(cfg: Mapping, *names: str, default: object = None) -> object:
    for name in names:
        if name in cfg:
            return cfg[name]
    return default


def _group(value: object, where: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1) \
            or (value > 0 and value % 8):
        raise ValueError(f"{where}.group_size must be -1 or a positive multiple of 8, got {value!r}")
    return value


def _bits(value: object, where: str) -> None:
    if value != 4:
        raise ValueError(f"{where}.bits is {value!r}: sageLLM runs 4-bit {where.split('.')[0]} "
                         f"checkpoints only")


def int4_format_of(qcfg: Mapping | None) -> Int4Format | None:
    """The 4-bit layout a ``quantization_config`` describes; ``None`` for no config or another
    kind of quantization (FP8, say), ``ValueError`` for a 4-bit format sageLLM cannot run."""
    if not qcfg:
        return None
    if not isinstance(qcfg, Mapping):
        raise ValueError(f"quantization_config must be an object, got {type(qcfg).__name__}")
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "gptq":
        _bits(qcfg.get("bits"), "gptq.bits")
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq.checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
        return Int4Format("gptq", _group(qcfg.get("group_size", 128), "gptq"),
                          bool(qcfg.get("sym", True)), 1 if fmt == "gptq" else 0)
    if method == "awq":
        _bits(_field(qcfg, "bits", "w_bit"), "awq.bits")
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq.version {version!r} is not supported: sageLLM reads AWQ's gemm "
                             f"layout only")
        if not _field(qcfg, "zero_point", default=True):
            raise ValueError("awq.zero_point false is not supported (AWQ gemm checkpoints have "
                             "zero points)")
        return Int4Format("awq", _group(_field(qcfg, "group_size", "q_group_size",
                                               default=128), "awq"))
    if method == "compressed-tensors":
        return _compressed_tensors_format(qcfg)
    return None


def _compressed_tensors_format(qcfg: Mapping) -> Int4Format | None:
    groups = qcfg.get("config_groups")
    groups = {} if groups is None else groups
    if not isinstance(groups, Mapping):
        raise ValueError("compressed-tensors.config_groups must be an object")
    found: list[Int4Format] = []
    for name, scheme in groups.items():
        weights = (scheme or {}).get("weights") if isinstance(scheme, Mapping) else None
        if not isinstance(weights, Mapping) or weights.get("type", "int") != "int" \
                or weights.get("num_bits") != 4:
            continue
        where = f"compressed-tensors.config_groups.{name}.weights"
        if (scheme.get("input_activations") or None) is not None:
            raise ValueError(f"compressed-tensors.config_groups.{name}.input_activations: 4-bit "
                             f"weights with quantized activations are not supported (weight-only "
                             f"W4A16 is)")
        fmt = scheme.get("format") or qcfg.get("format")
        if fmt != "pack-quantized":
            raise ValueError(f"compressed-tensors.config_groups.{name}.format {fmt!r} is not "
                             f"supported for 4-bit weights (pack-quantized is)")
        strategy = weights.get("strategy")
        if strategy == "group":
            group = _group(weights.get("group_size"), where)
        elif strategy == "channel":
            group = -1
        else:
            raise ValueError(f"{where}.strategy {strategy!r} is not supported (group or channel)")
        found.append(Int4Format("compressed-tensors", group, bool(weights.get("symmetric", True))))
    if not found:
        return None
    if len(set(found)) > 1:
        raise ValueError("compressed-tensors.config_groups mix 4-bit layouts "
                         f"({sorted({f.group for f in found})}); sageLLM runs one per checkpoint")
    return found[0]


def read_int4_format(model_dir: Path) -> Int4Format | None:
    """The 4-bit layout of the HF directory ``model_dir`` (``config.json``'s
    ``quantization_config``, else a ``quantize_config.json`` beside it), ``None`` if none."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config")
    side = Path(model_dir) / "quantize_config.json"
    if qcfg is None and side.is_file():
        qcfg = {"quant_method": "gptq", **json.loads(side.read_text())}
    return int4_format_of(qcfg)


# -- unpacking -----------------------------------------------------------------------------------

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """The 8 nibbles of each int32 along ``dim`` (nibble ``i`` at bits ``4i``), that dimension
    eight times longer."""
    w = words.to(torch.int32).movedim(dim, -1)
    out = (w[..., None] >> _SHIFTS) & 0xF
    return out.flatten(-2).movedim(-1, dim).to(torch.uint8)


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None
            ) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} is {t.dtype}, expected {dtype}")


def grid_from_codes(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                    g_idx: torch.Tensor | None, group: int, name: str) -> Int4Grid:
    """The grid of ``w[n, k] = (codes[n, k] - zero[n, g]) * scale[n, g]``, ``g = g_idx[k]``
    (default ``k // group``); inputs are reordered by group where ``g_idx`` is out of order."""
    n, k = codes.shape
    group = k if group == -1 else group
    if k % group:
        raise ValueError(f"{name}: {k} inputs are not a whole number of groups of {group}")
    num_groups = k // group
    _expect(f"{name} scales", scale, (n, num_groups))
    scale = scale.float()
    minimum = -zero.float() * scale
    default = torch.arange(k) // group
    perm = None
    if g_idx is not None:
        _expect(f"{name}.g_idx", g_idx, (k,))
        g_idx = g_idx.long()
        if not torch.equal(g_idx, default):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], default):
                raise ValueError(f"{name}.g_idx does not put exactly {group} inputs in each of "
                                 f"{num_groups} groups")
            codes = codes[:, perm]
    return Int4Grid(codes.contiguous(), scale.contiguous(), minimum.contiguous(), perm)


def grid_of(fmt: Int4Format, prefix: str, parts: Mapping[str, torch.Tensor]) -> Int4Grid:
    """The grid of the packed linear ``prefix`` from its tensors (by suffix)."""
    required, _ = PARTS[fmt.method]
    missing = [s for s in required if s not in parts]
    if missing:
        raise ValueError(f"checkpoint linear {prefix} lacks {', '.join(missing)} "
                         f"({fmt.method} format)")
    if fmt.method == "gptq":
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        _expect(f"{prefix}.qweight", qweight, tuple(qweight.shape), torch.int32)
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        num_groups = scales.shape[0]
        _expect(f"{prefix}.qzeros", qzeros, (num_groups, -(-n // 8)), torch.int32)
        codes = _nibbles(qweight, 0).t()
        zero = _nibbles(qzeros, 1)[:, :n].t().to(torch.int16) + fmt.zero_offset
        return grid_from_codes(codes, zero, scales.t(), parts.get("g_idx"), fmt.group, prefix)
    if fmt.method == "awq":
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        _expect(f"{prefix}.qweight", qweight, tuple(qweight.shape), torch.int32)
        k, n = qweight.shape[0], qweight.shape[1] * 8
        inverse = [AWQ_ORDER.index(j) for j in range(8)]

        def unpack(words: torch.Tensor) -> torch.Tensor:
            nib = _nibbles(words, 1).view(words.shape[0], -1, 8)
            return nib[..., inverse].reshape(words.shape[0], -1)

        _expect(f"{prefix}.qzeros", qzeros, (scales.shape[0], n // 8), torch.int32)
        codes = unpack(qweight).t()
        zero = unpack(qzeros).t()
        return grid_from_codes(codes, zero, scales.t(), None, fmt.group, prefix)
    packed, scale = parts["weight_packed"], parts["weight_scale"]
    _expect(f"{prefix}.weight_packed", packed, tuple(packed.shape), torch.int32)
    n = packed.shape[0]
    k = packed.shape[1] * 8
    if "weight_shape" in parts:
        shape = tuple(int(v) for v in parts["weight_shape"].tolist())
        if len(shape) != 2 or shape[0] != n or not k - 8 < shape[1] <= k:
            raise ValueError(f"{prefix}.weight_shape {list(shape)} does not match weight_packed "
                             f"{list(packed.shape)}")
        k = shape[1]
    codes = _nibbles(packed, 1)[:, :k]
    if "weight_zero_point" in parts:
        zp = parts["weight_zero_point"]
        if fmt.sym:
            raise ValueError(f"{prefix}.weight_zero_point is stored but the scheme is symmetric")
        _expect(f"{prefix}.weight_zero_point", zp, (-(-n // 8), scale.shape[1]), torch.int32)
        zero = _nibbles(zp, 0)[:n]
    elif fmt.sym:
        zero = torch.full(scale.shape, 8, dtype=torch.uint8)
    else:
        raise ValueError(f"checkpoint linear {prefix} lacks weight_zero_point (asymmetric scheme)")
    return grid_from_codes(codes, zero, scale, parts.get("weight_g_idx"), fmt.group, prefix)


def _split(name: str, fmt: Int4Format) -> tuple[str, str] | None:
    prefix, _, suffix = name.rpartition(".")
    return (prefix, suffix) if suffix in fmt.suffixes else None


def dequantized_weights(weights: Iterable[tuple[str, torch.Tensor]], fmt: Int4Format
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with every packed linear's tensors replaced by its float32 ``prefix.weight``
    (the packed parts are held until the stream ends, as shards may split them)."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        split = _split(name, fmt)
        if split is None:
            yield name, tensor
        else:
            held.setdefault(split[0], {})[split[1]] = tensor
    for prefix, parts in held.items():
        yield f"{prefix}.weight", grid_of(fmt, prefix, parts).dequantize()


class StoredGrids(Mapping[str, Int4Grid]):
    """The grids of a packed checkpoint by float weight name (``model.layers.0.mlp.down_proj.
    weight``), each read from the safetensors files when asked for."""

    def __init__(self, model_dir: Path, fmt: Int4Format) -> None:
        from safetensors import safe_open

        self.fmt = fmt
        self._where: dict[str, dict[str, str]] = {}
        for f in sorted(glob.glob(str(Path(model_dir) / "*.safetensors"))):
            with safe_open(f, framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    split = _split(name, fmt)
                    if split is not None:
                        self._where.setdefault(f"{split[0]}.weight", {})[split[1]] = f

    def __getitem__(self, name: str) -> Int4Grid:
        from safetensors import safe_open

        files = self._where[name]
        prefix = name.removesuffix(".weight")
        parts = {}
        for suffix, f in files.items():
            with safe_open(f, framework="pt", device="cpu") as fh:
                parts[suffix] = fh.get_tensor(f"{prefix}.{suffix}")
        return grid_of(self.fmt, prefix, parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
