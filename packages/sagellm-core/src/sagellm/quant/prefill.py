"""Long inputs (prefill) through a dense GEMM instead of the packed weight-only kernels.

torch's CPU ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` are GEMV-shaped: at one
to a few dozen rows they beat a float GEMM by reading fewer weight bytes, but at a 512-token
prefill they run 1.2-1.3x slower than float32 and 2.2-2.4x slower than a bfloat16 GEMM. From a
scheme's ``dense_min_tokens`` rows on, a quantized linear rebuilds its bfloat16 weight for the
one call (exact for int8, the kernel's own ``(code - 8) * scale + zero`` for int4) and
multiplies densely; the rebuilt weight is not kept.

Measured per SmolLM2-135M layer (qkv, o, gate_up, down), one thread, CPU time (robust on a
shared box), AVX512-BF16, ms per layer at 16 / 64 / 128 / 512 rows: float32 1.6 / 5.1 / 9.7 /
39; int8 kernel 1.6 / 6.2 / 12.5 / 50, dense 1.4 / 3.0 / 5.2 / 21; int4 kernel 1.5 / 5.6 /
11.0 / 45, dense (unpacking included) 4.3 / 5.8 / 8.1 / 23. The CPU backend prefills in chunks
of 128 tokens (``backends.cpu.PREFILL_CHUNK_TOKENS``), so the weight is rebuilt once per chunk:
whole 512-token prefills, one thread, CPU seconds: float32 2.17, int8 1.32, int4 1.98 with a
nibble rebuild, 1.68 with the int8-code one against float32's 2.07 in the same process
(benchmarks/results/cpu-int4-prefill-2026-12-02.json).

The dense GEMM is bfloat16 only where the CPU has native bfloat16 arithmetic
(:func:`~sagellm.quant.cpu_features.has_fast_bf16`); elsewhere it is float32. On an AVX2 CPU
the emulated bfloat16 GEMM is both slower than float32 and coarser: SmolLM2's int8 perplexity on
the test text came out 2.3% above float32's with it (20.84 against 20.38, on CI's machine and
under ``ATEN_CPU_CAPABILITY=avx2``), 1.6% with the float32 GEMM, 1.55% with native bfloat16
(the rest is the int8 rounding itself).
"""

from __future__ import annotations

import torch

from sagellm.quant.cpu_features import has_fast_bf16


def dense_dtype() -> torch.dtype:
    """The dtype of the long-input GEMM on this CPU: bfloat16 with native bfloat16 arithmetic,
    float32 without."""
    return torch.bfloat16 if has_fast_bf16() else torch.float32


def dense_matmul(x: torch.Tensor, weight: torch.Tensor,
                 out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [tokens, in] @ weight[out, in]^T`` in :func:`dense_dtype` (``weight`` is cast to it,
    int8 values exactly), times ``out_scale [out]`` if given, returned in ``x``'s dtype."""
    dtype = dense_dtype()
    y = x.to(dtype) @ weight.to(dtype).t()
    if out_scale is not None:
        y.mul_(out_scale)
    return y.to(x.dtype)
