"""GGUF's stored 4-bit blocks read as :class:`~sagellm.quant.grids.Int4Grid`, without going
through float.

Q4_1 (20 bytes per 32 weights): float16 ``d``, float16 ``m``, 16 bytes of codes, value ``j`` in
the low nibble of byte ``j`` and value ``j + 16`` in its high nibble; ``w = d * code + m``.
Q4_0 (18 bytes): float16 ``d`` then the same nibbles; ``w = d * (code - 8)``, that is the Q4_1
grid with ``m = -8 d``. Other types (Q8_0's per-block scales, K-quants) have no exact place on
the grids sageLLM packs and are dequantized and requantized instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sagellm.quant.grids import Int4Grid

BLOCK = 32
_HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4}


def int4_grid_from_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Grid:
    """The grid of a Q4_0/Q4_1 tensor ``[rows, cols]`` from its raw bytes (any shape that holds
    ``rows`` rows of blocks, as ``gguf.GGUFReader`` gives them)."""
    header = _HEADER_BYTES.get(type_name)
    if header is None:
        raise ValueError(f"GGUF type {type_name} is not a 4-bit block type sageLLM repacks")
    rows, cols = shape
    if cols % BLOCK:
        raise ValueError(f"a {type_name} row of {cols} values is not a whole number of blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK,
                                                                header + BLOCK // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8.0 * d
    qs = blocks[..., header:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))


def stored_int4_grids(path: Path, config: dict) -> Iterator[tuple[str, Int4Grid]]:
    """``(HF tensor name, grid)`` of every 4-bit linear weight stored in the GGUF file, rows in
    the HF order (llama.cpp's rotary interleave of q/k projections undone, as for float)."""
    import gguf

    from sagellm.loader.gguf_loader import _unpermute, hf_name

    reader = gguf.GGUFReader(str(path))
    permute = config.get("model_type") == "llama"
    for t in reader.tensors:
        if t.tensor_type.name not in _HEADER_BYTES or len(t.shape) != 2:
            continue
        cols, rows = (int(x) for x in t.shape)
        name = hf_name(t.name)
        grid = int4_grid_from_blocks(t.data, t.tensor_type.name, (rows, cols))
        heads = None
        if permute and name.endswith("q_proj.weight"):
            heads = config["num_attention_heads"]
        elif permute and name.endswith("k_proj.weight"):
            heads = config["num_key_value_heads"]
        if heads is not None:
            grid = Int4Grid(*(torch.from_numpy(np.ascontiguousarray(_unpermute(a.numpy(), heads)))
                              for a in (grid.codes, grid.scale, grid.minimum)))
        yield name, grid


def stored_scheme(path: Path) -> str | None:
    """The scheme the file's linear weights are stored in: ``int4`` (Q4_0/Q4_1), ``int8``
    (Q8_0), else ``None`` (float, or a mix sageLLM runs as float)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    kinds = {t.tensor_type.name for t in reader.tensors
             if len(t.shape) == 2 and t.name.startswith("blk.")}
    if kinds and kinds <= set(_HEADER_BYTES):
        return "int4"
    if kinds == {"Q8_0"}:
        return "int8"
    return None
