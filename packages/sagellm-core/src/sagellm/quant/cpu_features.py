"""What this CPU runs fast, as far as the quantized kernels care."""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_fast_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX), which the int8/int4 kernels' fast path
    and bfloat16 GEMMs use; without it they emulate bfloat16 and lose their edge over float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
