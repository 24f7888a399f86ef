"""Split-K of the decode kernels (fp8 GEMV, int4 W4A16): the arrival counters, and the output
store both kernels end with (:func:`store_tile`).

A split-K launch has each split of an output tile store its float32 partial; the split that
arrives last at the tile's counter (an atomic add) sums the partials in split order, writes the
output and sets the counter back to zero. One launch, no zero-filled accumulator, no reduction
or cast kernel after it, and a deterministic sum. The counters stay zero between launches, so
one buffer per device serves every launch on the stream in turn (a CUDA graph replays them in
the captured order; two split-K launches must never run concurrently on two streams).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

#: Output tiles one split-K launch may count arrivals for; a product with more tiles is wide
#: enough to fill the GPU unsplit.
SPLIT_TILES = 1 << 14


@functools.cache
def split_counters(device: torch.device) -> torch.Tensor:
    """The device's counters, all zero between launches. Allocated once: a weight asks at load
    or first (eager) product, so none is first made inside a CUDA-graph capture, where the
    zero-fill would be recorded rather than run."""
    return torch.zeros(SPLIT_TILES, dtype=torch.int32, device=device)


def plan_split(k: int, block_k: int, want: int, tiles: int) -> tuple[int, int]:
    """``(inputs per split, splits)`` for ``want`` splits of ``k`` inputs: each split a whole
    number of ``block_k`` tiles (and so of scale groups), the count what that rounding leaves;
    unsplit when the launch has more than :data:`SPLIT_TILES` output ``tiles``."""
    per_split = triton.cdiv(triton.cdiv(k, max(1, want)), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    if splits > 1 and tiles > SPLIT_TILES:
        return triton.cdiv(k, block_k) * block_k, 1
    return per_split, splits


def split_buffers(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' ``(part_ptr, cnt_ptr)`` for an output ``out [M, N]``: float32 partials
    ``[splits, M, N]`` and the device's counters; unsplit, ``out`` twice (never read)."""
    if splits == 1:
        return out, out
    m, n = out.shape
    return (torch.empty((splits, m, n), dtype=torch.float32, device=out.device),
            split_counters(out.device))


@triton.jit
def store_tile(acc, y_ptr, part_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, pid_m, pid_n,
               split, M, N, USE_DOT: tl.constexpr, SPLIT: tl.constexpr):
    """The end of a decode program (inlined into the kernel): its float32 tile ``acc`` of
    ``y [M, N]`` is rows ``offs_m`` by columns ``offs_n`` (``USE_DOT``), else row ``pid_m``'s
    columns ``offs_n``. Unsplit it is cast and stored. ``SPLIT`` (splits on program axis 2,
    ``split`` this one, output tiles counted as ``pid_m * num_programs(0) + pid_n``): the
    partial goes to ``part_ptr [splits, M, N]``, and the split that arrives last at the tile's
    counter sums every partial in split order, writes ``y`` and resets the counter."""
    if USE_DOT:
        out = offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    else:
        out = pid_m * N + offs_n
        mask = mask_n
    if SPLIT:
        tl.store(part_ptr + split * M * N + out, acc, mask=mask)
        tile = pid_m * tl.num_programs(0) + pid_n
        # Every thread's partial stored before the (acq_rel, GPU-scope) arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == tl.num_programs(2) - 1:
            total = tl.zeros_like(acc)
            for i in range(0, tl.num_programs(2)):
                # .cg: read past the L1, where another SM's partial cannot be stale.
                total += tl.load(part_ptr + i * M * N + out, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)
