"""Write a float HF checkpoint as a 4-bit GPTQ, AWQ or compressed-tensors one (tests).

Each linear of the decoder layers is quantized round-to-nearest with integer zero points (the
grid of :func:`sagellm.quant.grids.quantize_int4_zero_point`) and packed in the format's layout
as :mod:`sagellm.quant.int4_checkpoints` describes it; the packing is the inverse of that
module's reading, which the tests check against the formats' own libraries (fixtures written by
auto-gptq, autoawq and compressed-tensors). Embeddings, norms and the head stay float.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sagellm.quant.grids import quantize_int4_zero_point
from sagellm.quant.int4_checkpoints import AWQ_ORDER

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32 along ``dim`` (value ``i`` of a word at bits ``4i``)."""
    v = values.to(torch.int64).movedim(dim, -1)
    pad = -v.shape[-1] % 8
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, 8)
    return (v << _SHIFTS).sum(-1).to(torch.int32).movedim(-1, dim).contiguous()


def quantize(w: torch.Tensor, group: int, g_idx: torch.Tensor, min_zero: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K] (inputs in their own order), integer zeros [N, G] in ``[min_zero, 15]``,
    float16 scales [N, G]."""
    perm = torch.argsort(g_idx, stable=True)
    grid = quantize_int4_zero_point(w[:, perm].float(), group)
    scale = grid.scale.half().float()
    zero = torch.round(-grid.minimum / grid.scale).clamp(min_zero, 15)
    g = torch.arange(w.shape[1]) // group
    codes_sorted = (torch.round(w[:, perm].float() / scale[:, g]) + zero[:, g]).clamp(0, 15)
    codes = torch.empty_like(codes_sorted)
    codes[:, perm] = codes_sorted
    return codes.to(torch.uint8), zero.to(torch.int64), scale.half()


def pack_linear(method: str, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                g_idx: torch.Tensor, sym: bool = False) -> dict[str, torch.Tensor]:
    """The tensors (by suffix) of one linear in ``method``'s layout."""
    n, k = codes.shape
    if method == "gptq":  # v1: zeros stored minus one
        return {"qweight": pack_nibbles(codes.t(), 0),
                "qzeros": pack_nibbles((zero - 1).t() & 0xF, 1), "scales": scale.t().contiguous(),
                "g_idx": g_idx.to(torch.int32)}
    if method == "awq":
        order = torch.tensor(AWQ_ORDER)

        def interleave(x: torch.Tensor) -> torch.Tensor:  # [rows, N] -> AWQ's nibble order
            return x.reshape(x.shape[0], -1, 8)[..., order].reshape(x.shape[0], -1)

        return {"qweight": pack_nibbles(interleave(codes.t()), 1),
                "qzeros": pack_nibbles(interleave(zero.t()), 1), "scales": scale.t().contiguous()}
    if method == "compressed-tensors":
        out = {"weight_packed": pack_nibbles(codes, 1), "weight_scale": scale.contiguous(),
               "weight_shape": torch.tensor([n, k])}
        if not sym:
            out["weight_zero_point"] = pack_nibbles(zero, 0)
        if not torch.equal(g_idx, torch.arange(k) // (k // scale.shape[1])):
            out["weight_g_idx"] = g_idx.to(torch.int32)
        return out
    raise ValueError(f"unknown method {method!r}")


def quantization_config(method: str, group: int, act_order: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                "sym": False, "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                "zero_point": True}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                "group_size": group, "actorder": "group" if act_order else None}}},
            "ignore": ["lm_head"]}


def write_int4_checkpoint(float_dir: str | Path, out_dir: str | Path, method: str,
                          group: int = 32, act_order: bool = False, seed: int = 0) -> Path:
    """``float_dir`` (config.json + model.safetensors) quantized into ``out_dir``; act-order
    shuffles each linear's input groups (GPTQ ``desc_act``; AWQ has none)."""
    from safetensors.torch import load_file, save_file

    src, out = Path(float_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(method, group, act_order)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    orders: dict[tuple[str, str], torch.Tensor] = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEARS):
            tensors[name] = t
            continue
        k = t.shape[1]
        g_idx = torch.arange(k) // group
        if act_order:
            # GPTQ orders inputs by their Hessian, so linears that read one input share an order.
            layer, proj = prefix.rsplit(".", 1)
            key = (layer.rsplit(".", 1)[0], SHARED_INPUT.get(proj, proj))
            if key not in orders:
                orders[key] = g_idx[torch.randperm(k, generator=gen)]
            g_idx = orders[key]
        # GPTQ v1 stores zero - 1 in 4 bits, so a zero of 0 has no code (its libraries' limit).
        parts = pack_linear(method, *quantize(t, group, g_idx, int(method == "gptq")), g_idx)
        tensors.update({f"{prefix}.{s}": v for s, v in parts.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
