"""Tile configurations of the fused MoE GEMMs: tuned tables per device, a heuristic otherwise.

A table is a JSON file in ``moe_configs/`` named after the device
(:func:`~sagellm_cuda.tile_tables.device_slug`, e.g. ``nvidia_h200.json``), written by
``benchmarks/tune_moe.py``::

    {"device": "NVIDIA H200",
     "tables": {"E=128,N=768,K=2048,dtype=bfloat16,gemm=gate_up": {"1": {"BLOCK_M": 16, ...},
                                                                   "16": {...}, ...},
                "E=128,N=2048,K=768,dtype=bfloat16,gemm=down": {...}}}

``N`` and ``K`` are the GEMM's own: the gate/up GEMM (silu fused) has ``N`` the intermediate size
per rank and ``K`` the hidden size; the down GEMM the reverse. Token counts are buckets: a step
with ``T`` tokens uses the smallest bucket at or above ``T`` (the largest past the end).
``SAGELLM_CUDA_MOE_CONFIGS`` names another file or directory to read instead. The file
mechanics (loading, checks, buckets) live in :mod:`sagellm_cuda.tile_tables`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from sagellm_cuda.tile_tables import TileTables, pick_bucket
from sagellm_cuda.tile_tables import device_name as _device_name
from sagellm_cuda.tile_tables import device_slug as device_slug  # the tuners' file names

GEMMS = ("gate_up", "down")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
CONFIG_DIR = Path(__file__).with_name("moe_configs")
ENV_VAR = "SAGELLM_CUDA_MOE_CONFIGS"


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


_TABLES = TileTables(env_var=ENV_VAR, config_dir=CONFIG_DIR, check_config=check_config,
                     bucket="token")
parse_tables = _TABLES.parse
load_tables = _TABLES.load
device_tables = _TABLES.device_tables


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
    _TABLES.clear_cache()
    _lookup.cache_clear()
