"""Arrival counters of the split-K decode kernels (fp8 GEMV, int4 W4A16).

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

#: Output tiles one split-K launch may count arrivals for; a product with more tiles is wide
#: enough to fill the GPU unsplit.
SPLIT_TILES = 1 << 14


@functools.cache
def split_counters(device: torch.device) -> torch.Tensor:
    """The device's counters, all zero between launches. Allocated once: a weight asks at load
    or first (eager) product, so none is first made inside a CUDA-graph capture, where the
    zero-fill would be recorded rather than run."""
    return torch.zeros(SPLIT_TILES, dtype=torch.int32, device=device)
