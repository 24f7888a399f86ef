"""Launch configurations of the decode products (M <= 16 rows): tuned tables per device.

Two kernels read a table: the fp8 W8A16 GEMV (:func:`sagellm_cuda.fp8_kernels.fp8_gemv`,
``kind="fp8"``) and the W4A16 dequant-GEMM at decode (:func:`sagellm_cuda.int4_gemm.w4a16_matmul`,
``kind="int4"``). A table is a JSON file in ``gemv_configs/`` named after the device (the MoE
tables' :func:`~sagellm_cuda.moe_tiles.device_slug`, e.g. ``nvidia_h200.json``), written by
``benchmarks/tune_gemv.py``::

    {"device": "NVIDIA H200",
     "tables": {"kind=fp8,N=6144,K=4096,group=0,dtype=bfloat16": {"1": {"BLOCK_M": 1, ...},
                                                                  "16": {...}}}}

``group=0`` is one scale per output channel. Row counts are buckets: ``M`` rows use the smallest
bucket at or above ``M`` (the largest past the end). A shape or device without a table keeps
the kernel's own heuristic (the lookup answers None). ``SAGELLM_CUDA_GEMV_CONFIGS`` names
another file or directory to read instead. A malformed table is refused (ValueError naming the
file, key and field) rather than ignored: a tuned table that silently stops applying would
look like a regression of the kernel.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import torch

from sagellm_cuda.moe_tiles import device_slug

KINDS = ("fp8", "int4")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
#: The most rows a decode config is for (one ``tl.dot`` tile).
MAX_M = 16
CONFIG_DIR = Path(__file__).with_name("gemv_configs")
ENV_VAR = "SAGELLM_CUDA_GEMV_CONFIGS"

Table = dict[str, dict[int, dict[str, int]]]


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


def parse_tables(doc: object, where: str) -> Table:
    """A table file's content (``json.load``), checked, with row buckets as ints."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise ValueError(f"{where}: expected an object with a 'tables' object")
    tables: Table = {}
    for key, buckets in doc["tables"].items():
        if not isinstance(key, str) or not key.startswith("kind="):
            raise ValueError(f"{where}: table key {key!r} is not 'kind=...,N=...,K=...,group=...,"
                             "dtype=...'")
        if not isinstance(buckets, dict) or not buckets:
            raise ValueError(f"{where}: tables[{key!r}] must be a non-empty object of row "
                             "buckets")
        parsed = {}
        for rows, cfg in buckets.items():
            try:
                m = int(rows)
            except ValueError:
                raise ValueError(f"{where}: tables[{key!r}]: row bucket {rows!r} is not an "
                                 "integer") from None
            if not 1 <= m <= MAX_M:
                raise ValueError(f"{where}: tables[{key!r}]: row bucket {m} must be in "
                                 f"1..{MAX_M}")
            parsed[m] = check_config(cfg, f"{where}: tables[{key!r}][{rows!r}]")
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
    """``$SAGELLM_CUDA_GEMV_CONFIGS`` (a file, or a directory holding ``<slug>.json``) if set,
    else the shipped ``gemv_configs/<slug>.json``; empty if none."""
    override = os.environ.get(ENV_VAR)
    base = Path(override) if override else CONFIG_DIR
    path = base if base.is_file() else base / f"{device_slug(device_name)}.json"
    if override and not path.exists():
        raise ValueError(f"{ENV_VAR}={override}: no such file (looked for {path})")
    return load_tables(path) if path.exists() else {}


def pick_bucket(buckets: dict[int, dict[str, int]], m: int) -> dict[str, int]:
    """The config of the smallest bucket at or above ``m``, else of the largest."""
    for t, cfg in buckets.items():  # sorted ascending by parse_tables
        if t >= m:
            return cfg
    return cfg


@cache
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


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
    device_tables.cache_clear()
    _lookup.cache_clear()
