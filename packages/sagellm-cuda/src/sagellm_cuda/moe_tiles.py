"""Tile configurations of the fused MoE GEMMs: tuned tables per device, a heuristic otherwise.

A table is a JSON file in ``moe_configs/`` named after the device (:func:`device_slug`, e.g.
``nvidia_h200.json``), written by ``benchmarks/tune_moe.py``::

    {"device": "NVIDIA H200",
     "tables": {"E=128,N=768,K=2048,dtype=bfloat16,gemm=gate_up": {"1": {"BLOCK_M": 16, ...},
                                                                   "16": {...}, ...},
                "E=128,N=2048,K=768,dtype=bfloat16,gemm=down": {...}}}

``N`` and ``K`` are the GEMM's own: the gate/up GEMM (silu fused) has ``N`` the intermediate size
per rank and ``K`` the hidden size; the down GEMM the reverse. Token counts are buckets: a step
with ``T`` tokens uses the smallest bucket at or above ``T`` (the largest past the end).
``SAGELLM_CUDA_MOE_CONFIGS`` names another file or directory to read instead.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

import torch

GEMMS = ("gate_up", "down")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
CONFIG_DIR = Path(__file__).with_name("moe_configs")
ENV_VAR = "SAGELLM_CUDA_MOE_CONFIGS"

Table = dict[str, dict[int, dict[str, int]]]


def block_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes by the expected rows per expert when no table matches: decode steps put a
    handful of rows on each expert, so a tall tile would mostly multiply padding."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def table_key(num_experts: int, n: int, k: int, dtype: torch.dtype | str, gemm: str) -> str:
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, not {gemm!r}")
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return f"E={num_experts},N={n},K={k},dtype={name},gemm={gemm}"


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"``: the table's file name for a device."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def check_config(cfg: object, where: str) -> dict[str, int]:
    """One tile configuration, checked: every field present, a positive int, powers of two for
    the tile sizes and warps."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: a tile config must be an object, got {type(cfg).__name__}")
    unknown = set(cfg) - set(FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected {list(FIELDS)}")
    out = {}
    for f in FIELDS:
        v = cfg.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {f} must be a positive integer, got {v!r}")
        if f in _POW2_FIELDS and v & (v - 1):
            raise ValueError(f"{where}: {f} must be a power of two, got {v}")
        out[f] = v
    if out["BLOCK_M"] < 16 or out["BLOCK_N"] < 16 or out["BLOCK_K"] < 16:
        raise ValueError(f"{where}: BLOCK_M, BLOCK_N and BLOCK_K must be at least 16 (tl.dot)")
    return out


def parse_tables(doc: object, where: str) -> Table:
    """A table file's content (``json.load``), checked, with token buckets as ints."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise ValueError(f"{where}: expected an object with a 'tables' object")
    tables: Table = {}
    for key, buckets in doc["tables"].items():
        if not isinstance(buckets, dict) or not buckets:
            raise ValueError(f"{where}: tables[{key!r}] must be a non-empty object of token "
                             "buckets")
        parsed = {}
        for tokens, cfg in buckets.items():
            try:
                t = int(tokens)
            except ValueError:
                raise ValueError(f"{where}: tables[{key!r}]: token bucket {tokens!r} is not an "
                                 "integer") from None
            if t < 1:
                raise ValueError(f"{where}: tables[{key!r}]: token bucket {t} must be >= 1")
            parsed[t] = check_config(cfg, f"{where}: tables[{key!r}][{tokens!r}]")
        tables[key] = dict(sorted(parsed.items()))
    return tables


def load_tables(path: Path) -> Table:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_tables(doc, str(path))


@cache
def device_tables(device_name: str) -> Table:
    """The tables for a device: ``$SAGELLM_CUDA_MOE_CONFIGS`` (a file, or a directory holding
    ``<slug>.json``) if set, else the shipped ``moe_configs/<slug>.json``; empty if none."""
    override = os.environ.get(ENV_VAR)
    base = Path(override) if override else CONFIG_DIR
    path = base if base.is_file() else base / f"{device_slug(device_name)}.json"
    if override and not path.exists():
        raise ValueError(f"{ENV_VAR}={override}: no such file (looked for {path})")
    return load_tables(path) if path.exists() else {}


def pick_bucket(buckets: dict[int, dict[str, int]], num_tokens: int) -> dict[str, int]:
    """The config of the smallest bucket at or above ``num_tokens``, else of the largest."""
    for t, cfg in buckets.items():  # sorted ascending by parse_tables
        if t >= num_tokens:
            return cfg
    return cfg


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


@cache
def _lookup(device_name: str, num_tokens: int, top_k: int, num_experts: int, hidden: int,
            inter: int, dtype: torch.dtype) -> tuple[dict[str, int], dict[str, int]]:
    tables = device_tables(device_name)
    up = tables.get(table_key(num_experts, inter, hidden, dtype, "gate_up"))
    down = tables.get(table_key(num_experts, hidden, inter, dtype, "down"))
    fallback = block_config(num_tokens * top_k, num_experts)
    return (pick_bucket(up, num_tokens) if up else fallback,
            pick_bucket(down, num_tokens) if down else fallback)


def tile_configs(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                 dtype: torch.dtype, device: torch.device) -> tuple[dict[str, int], dict[str, int]]:
    """(gate/up config, down config) for a step of ``num_tokens`` tokens: the device's table
    where it has this shape, the heuristic :func:`block_config` otherwise. Cached per shape."""
    return _lookup(_device_name(device), num_tokens, top_k, num_experts, hidden, inter, dtype)


def clear_cache() -> None:
    """Forget loaded tables and lookups (tests, or after writing a new table)."""
    device_tables.cache_clear()
    _lookup.cache_clear()
