"""Launch configurations of the decode products (M <= 16 rows): tuned tables per device.

Two kernels read a table: the fp8 W8A16 GEMV (:func:`sagellm_cuda.fp8_kernels.fp8_gemv`,
``kind="fp8"``) and the W4A16 dequant-GEMM at decode (:func:`sagellm_cuda.int4_gemm.w4a16_matmul`,
``kind="int4"``). A table is a JSON file in ``gemv_configs/`` named after the device
(:func:`~sagellm_cuda.tile_tables.device_slug`, e.g. ``nvidia_h200.json``), written by
``benchmarks/tune_gemv.py``::

    {"device": "NVIDIA H200",
     "tables": {"kind=fp8,N=6144,K=4096,group=0,dtype=bfloat16": {"1": {"BLOCK_M": 1, ...},
                                                                  "16": {...}}}}

``group=0`` is one scale per output channel. Row counts are buckets: ``M`` rows use the smallest
bucket at or above ``M`` (the largest past the end). A shape or device without a table keeps
the kernel's own heuristic (the lookup answers None). ``SAGELLM_CUDA_GEMV_CONFIGS`` names
another file or directory to read instead. A malformed table is refused (ValueError naming the
file, key and field). The file mechanics live in :mod:`sagellm_cuda.tile_tables`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from sagellm_cuda.tile_tables import TileTables, pick_bucket
from sagellm_cuda.tile_tables import device_name as _device_name
from sagellm_cuda.tile_tables import device_slug as device_slug  # the tuners' file names

KINDS = ("fp8", "int4")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
#: The most rows a decode config is for (one ``tl.dot`` tile).
MAX_M = 16
CONFIG_DIR = Path(__file__).with_name("gemv_configs")
ENV_VAR = "SAGELLM_CUDA_GEMV_CONFIGS"


def table_key(kind: str, n: int, k: int, group: int, dtype: torch.dtype | str) -> str:
    """``group`` 0 for one scale per output channel."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return f"kind={kind},N={n},K={k},group={group},dtype={name}"


def check_config(cfg: object, where: str) -> dict[str, int]:
    """One launch configuration, checked: every field a positive int, powers of two for the
    tiles and warps, ``BLOCK_M`` 1 (no ``tl.dot``) or 16 (one dot tile of rows)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: a launch config must be an object, got {type(cfg).__name__}")
    unknown = set(cfg) - set(FIELDS)
    missing = set(FIELDS) - set(cfg)
    if unknown or missing:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}, missing {sorted(missing)};"
                         f" expected {list(FIELDS)}")
    out = {}
    for f in FIELDS:
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {f} must be a positive integer, got {v!r}")
        if f in _POW2_FIELDS and v & (v - 1):
            raise ValueError(f"{where}: {f} must be a power of two, got {v}")
        out[f] = v
    if out["BLOCK_M"] not in (1, MAX_M):
        raise ValueError(f"{where}: BLOCK_M must be 1 or {MAX_M}, got {out['BLOCK_M']}")
    if out["BLOCK_N"] < 8 or out["BLOCK_K"] < 16 or out["num_warps"] > 16:
        raise ValueError(f"{where}: BLOCK_N >= 8, BLOCK_K >= 16 and num_warps <= 16 required, "
                         f"got {out}")
    if out["BLOCK_M"] > 1 and out["BLOCK_N"] < 16:
        raise ValueError(f"{where}: BLOCK_N >= 16 for a tl.dot tile (BLOCK_M {out['BLOCK_M']}),"
                         f" got {out['BLOCK_N']}")
    return out


_TABLES = TileTables(env_var=ENV_VAR, config_dir=CONFIG_DIR, check_config=check_config,
                     bucket="row", max_bucket=MAX_M,
                     key_form="kind=...,N=...,K=...,group=...,dtype=...")
parse_tables = _TABLES.parse
load_tables = _TABLES.load
device_tables = _TABLES.device_tables


@cache
def _lookup(device_name: str, key: str, m: int) -> dict[str, int] | None:
    buckets = device_tables(device_name).get(key)
    return dict(pick_bucket(buckets, m)) if buckets else None


def tuned_config(kind: str, m: int, n: int, k: int, group: int, dtype: torch.dtype,
                 device: torch.device) -> dict[str, int] | None:
    """The device table's config for an ``[m, k] x [k, n]`` decode product, or None (no table,
    no entry for the shape, or more than :data:`MAX_M` rows): the caller's heuristic then."""
    if not 1 <= m <= MAX_M:
        return None
    cfg = _lookup(_device_name(device), table_key(kind, n, k, group, dtype), m)
    return None if cfg is None else dict(cfg)


def clear_cache() -> None:
    """Forget loaded tables and lookups (tests, or after writing a new table)."""
    _TABLES.clear_cache()
    _lookup.cache_clear()
