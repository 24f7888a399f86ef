"""The (token, choice) pairs of a top-k routing grouped by expert, in row blocks of ``block_m``.

The grouped GEMM needs every row block to belong to one expert, so each expert's pairs are laid
out contiguously from a multiple of ``block_m``, in pair order (a stable sort by expert), with
padding rows in between. :func:`align_by_expert` does it in Triton, one launch for a decode-sized
batch and two for larger ones, with nothing read on the host (CUDA-graph safe);
:func:`align_by_expert_reference` is the same contract in torch ops, the reference it is tested
against.

How the kernel places a pair without a sort: the pairs are cut into chunks; inside a chunk a
one-hot matrix [chunk, experts] and its running sum down the chunk give each pair its rank among
the chunk's pairs of the same expert; the per-expert counts of the earlier chunks and the padded
start of each expert give the rest of its position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Up to this many chunks, every program counts all pairs itself (one launch); above, a first
#: launch writes each chunk's counts and the second sums them.
MAX_CHUNKS_ONE_LAUNCH = 4


def padded_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of ``sorted_pairs``: the worst case for ``num_pairs`` pairs, a function of the shape
    only (each expert that has pairs wastes at most ``block_m - 1`` rows)."""
    length = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-length // block_m) * block_m


def align_by_expert_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract, in torch ops. ``topk_ids`` [T, k] -> ``sorted_pairs`` [L] int32: flat pair
    indices (``token * k + choice``), each expert's pairs contiguous in pair order and starting on
    a multiple of ``block_m``, padding holding ``T * k``; ``block_expert`` [L / block_m] int32:
    the expert of each row block (``num_experts`` past the end); ``num_padded`` [1] int32: how
    many rows of ``sorted_pairs`` are in use. ``L`` is :func:`padded_length`."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    length = padded_length(n, num_experts, block_m)
    sorted_pairs = torch.full((length,), n, dtype=torch.int32, device=dev)
    sorted_pairs[(padded_end - padded)[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _one_hot(ids_ptr, chunk, num_pairs, CHUNK: tl.constexpr, EP: tl.constexpr):
    """Chunk ``chunk``'s pair indices [CHUNK] and their one-hot experts [CHUNK, EP] (int32;
    rows past the last pair are all zero)."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=EP).to(tl.int32)
    return offs, (ids[:, None] == tl.arange(0, EP)[None, :]).to(tl.int32)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, counts_ptr, num_pairs, CHUNK: tl.constexpr, EP: tl.constexpr):
    """``counts[c, e]``: how many pairs of chunk ``c`` chose expert ``e``."""
    c = tl.program_id(0)
    _, hot = _one_hot(ids_ptr, c, num_pairs, CHUNK, EP)
    tl.store(counts_ptr + c * EP + tl.arange(0, EP), tl.sum(hot, 0))


# Sizes as plain arguments: one compiled kernel per (experts, FROM_COUNTS) whatever the batch
# and block size, so the engine compiles it once at start-up.
@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "length", "num_experts", "block_m"])
def _place_kernel(ids_ptr, counts_ptr, pairs_ptr, block_expert_ptr, num_padded_ptr, num_pairs,
                  num_chunks, length, num_experts, block_m, CHUNK: tl.constexpr,
                  EP: tl.constexpr, FROM_COUNTS: tl.constexpr, COUNT_ROWS: tl.constexpr):
    """Program ``p`` places the pairs of chunk ``p`` and fills rows ``[p * CHUNK, (p + 1) *
    CHUNK)`` of ``sorted_pairs``'s padding and the block experts starting there."""
    p = tl.program_id(0)
    experts = tl.arange(0, EP)
    total = tl.zeros((EP,), dtype=tl.int32)
    before = tl.zeros((EP,), dtype=tl.int32)  # pairs per expert in chunks before ``p``
    if FROM_COUNTS:
        for c0 in range(0, num_chunks, COUNT_ROWS):
            chunks = c0 + tl.arange(0, COUNT_ROWS)
            tile = tl.load(counts_ptr + chunks[:, None] * EP + experts[None, :],
                           mask=(chunks < num_chunks)[:, None], other=0)
            total += tl.sum(tile, 0)
            before += tl.sum(tl.where((chunks < p)[:, None], tile, 0), 0)
    else:
        for c in range(0, num_chunks):
            _, hot = _one_hot(ids_ptr, c, num_pairs, CHUNK, EP)
            counts = tl.sum(hot, 0)
            total += counts
            before += tl.where(c < p, counts, 0)
    padded = (total + block_m - 1) // block_m * block_m
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    used = tl.sum(padded, 0)
    if p == 0:
        tl.store(num_padded_ptr, used)
    if p < num_chunks:
        offs, hot = _one_hot(ids_ptr, p, num_pairs, CHUNK, EP)
        rank = tl.cumsum(hot, 0) - 1  # among this chunk's pairs of the same expert
        pos = tl.sum(hot * (rank + (padded_start + before)[None, :]), 1)
        tl.store(pairs_ptr + pos, offs.to(tl.int32), mask=offs < num_pairs)
    rows = p * CHUNK + tl.arange(0, CHUNK)
    in_range = rows < length
    # The expert whose padded run holds the row: how many runs end at or before it.
    row_expert = tl.sum((padded_end[None, :] <= rows[:, None]).to(tl.int32), 1)
    row_hot = (row_expert[:, None] == experts[None, :]).to(tl.int32)
    run_start = tl.sum(row_hot * padded_start[None, :], 1)
    run_count = tl.sum(row_hot * total[None, :], 1)
    is_pad = (rows - run_start >= run_count) | (rows >= used)
    tl.store(pairs_ptr + rows, tl.zeros_like(rows) + num_pairs, mask=in_range & is_pad)
    tl.store(block_expert_ptr + rows // block_m, tl.minimum(row_expert, num_experts),
             mask=in_range & (rows % block_m == 0))


def chunk_size(num_experts: int) -> int:
    """Pairs per chunk: the one-hot tile [chunk, experts] stays about 8K elements."""
    ep = triton.next_power_of_2(num_experts)
    return max(16, min(1024, 8192 // ep))


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`align_by_expert_reference` returns (the same tensors, bit for bit), in one
    Triton launch when the pairs fit :data:`MAX_CHUNKS_ONE_LAUNCH` chunks, else two. Launch grids
    depend on the shape only."""
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m ({block_m}) must be a power of two, at least 16")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n = ids.numel()
    dev = ids.device
    ep = triton.next_power_of_2(num_experts)
    chunk = chunk_size(num_experts)
    num_chunks = triton.cdiv(n, chunk)
    length = padded_length(n, num_experts, block_m)
    sorted_pairs = torch.empty(length, dtype=torch.int32, device=dev)
    block_expert = torch.empty(length // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    from_counts = num_chunks > MAX_CHUNKS_ONE_LAUNCH
    counts = sorted_pairs  # unused unless from_counts
    if from_counts:
        counts = torch.empty(num_chunks, ep, dtype=torch.int32, device=dev)
        _count_kernel[(num_chunks,)](ids, counts, n, CHUNK=chunk, EP=ep)
    _place_kernel[(triton.cdiv(length, chunk),)](
        ids, counts, sorted_pairs, block_expert, num_padded, n, num_chunks, length, num_experts,
        block_m, CHUNK=chunk, EP=ep, FROM_COUNTS=from_counts,
        COUNT_ROWS=max(1, min(64, 8192 // ep)))
    return sorted_pairs, block_expert, num_padded
