"""Logprobs of chosen tokens and each row's top alternatives in two Triton launches
(``CudaPlatform.logprobs``; core's torch version is :func:`sagellm.layers.logprobs.torch_logprobs`).

The torch version makes a full ``[R, V]`` ``log_softmax``, a ``topk`` over it, a comparison and
a sum for the rank: four passes over the logits and a dozen launches. Here one pass reads each
logit once: the vocabulary is split into ``BLOCK``-wide chunks, one program per (row, chunk),
each keeping its chunk's maximum, sum of exponentials, count of logits above the chosen token's
and top ``K``; a second launch, one program per row, merges the chunks. Logprobs are
``(logit - max) - log(sum)`` in float32, as ``log_softmax`` computes them; ranks count raw logits
above the chosen one (``log_softmax`` is monotonic, so this is the torch version's count, less
any pair that rounding makes equal).

Ties: alternatives come by value, then lowest id first (``torch.topk`` leaves the order of equal
values unspecified; on the CPU it gives neither id order). Launches read shapes only (no host
sync), so they can run inside a captured CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm.layers.logprobs import LogprobTensors

#: The largest number of alternatives a launch keeps (requests ask for at most
#: ``sagellm.sampling_params.MAX_LOGPROBS``); ``K`` is the power of two at or above the ask.
MAX_TOP = 32
#: Vocabulary entries per program of the first launch.
DEFAULT_BLOCK = 2048


@triton.jit
def _select_top(vals, ids, out_vals_ptr, out_ids_ptr, m, log_s, K: tl.constexpr,
                BIG: tl.constexpr):
    """Store the ``K`` largest of ``vals`` (ties: lowest id) as ``(v - m) - log_s``, and their
    ``ids``."""
    taken = vals != vals  # all False, the shape of vals
    for j in tl.static_range(K):
        cand = tl.where(taken, float("-inf"), vals)
        best = tl.max(cand, 0)
        best_id = tl.min(tl.where((cand == best) & (taken == 0), ids, BIG), 0)
        tl.store(out_vals_ptr + j, (best - m) - log_s)
        tl.store(out_ids_ptr + j, best_id.to(out_ids_ptr.dtype.element_ty))
        taken = taken | (ids == best_id)


@triton.jit
def _chunk_kernel(logits_ptr, stride, tok_ptr, pmax_ptr, psum_ptr, pcount_ptr, pvals_ptr,
                  pids_ptr, V, P, K: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    chosen = tl.load(base + tl.load(tok_ptr + row)).to(tl.float32)
    m = tl.max(x, 0)
    # A chunk of -inf only (masked tokens, the padding past V) adds nothing (not exp(nan)).
    s = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - m)), 0)
    out = row * P + chunk
    tl.store(pmax_ptr + out, m)
    tl.store(psum_ptr + out, s)
    tl.store(pcount_ptr + out, tl.sum((x > chosen).to(tl.int32), 0))
    # Padding ids (>= V) are -inf with the largest ids, so every real id comes first.
    _select_top(x, offs, pvals_ptr + out * K, pids_ptr + out * K, 0.0, 0.0, K, BIG)


@triton.jit
def _merge_kernel(logits_ptr, stride, tok_ptr, pmax_ptr, psum_ptr, pcount_ptr, pvals_ptr,
                  pids_ptr, lp_ptr, rank_ptr, top_lp_ptr, top_ids_ptr, P, K: tl.constexpr,
                  PB: tl.constexpr, BIG: tl.constexpr):
    row = tl.program_id(0)
    p = tl.arange(0, PB)
    pm = p < P
    mx = tl.load(pmax_ptr + row * P + p, mask=pm, other=float("-inf"))
    sm = tl.load(psum_ptr + row * P + p, mask=pm, other=0.0)
    m = tl.max(mx, 0)
    log_s = tl.log(tl.sum(tl.where(mx == float("-inf"), 0.0, sm * tl.exp(mx - m)), 0))
    count = tl.sum(tl.load(pcount_ptr + row * P + p, mask=pm, other=0), 0)
    chosen = tl.load(logits_ptr + row.to(tl.int64) * stride + tl.load(tok_ptr + row))
    tl.store(lp_ptr + row, (chosen.to(tl.float32) - m) - log_s)
    tl.store(rank_ptr + row, count.to(tl.int64) + 1)
    c = tl.arange(0, PB * K)
    cm = c < P * K
    vals = tl.load(pvals_ptr + row * P * K + c, mask=cm, other=float("-inf"))
    ids = tl.load(pids_ptr + row * P * K + c, mask=cm, other=BIG)
    _select_top(vals, ids, top_lp_ptr + row * K, top_ids_ptr + row * K, m, log_s, K, BIG)


def top_bucket(k: int) -> int:
    """The ``K`` a launch for ``k`` alternatives compiles for (1, 2, 4, ... MAX_TOP)."""
    return 1 << max(k - 1, 0).bit_length()


def topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int,
                  block: int = DEFAULT_BLOCK) -> LogprobTensors:
    """For each row of ``logits`` [R, V] (raw logits, any float dtype, unit stride along V):
    the logprob and rank of ``token_ids[r]`` (``0 <= id < V``, not checked: that would wait for
    the device) and the ``min(k, V)`` most likely ids, as
    :func:`sagellm.layers.logprobs.torch_logprobs` gives them."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if not 0 <= k <= MAX_TOP:
        raise ValueError(f"k (the number of top logprobs) must be in 0..{MAX_TOP}, got {k}")
    rows, vocab = logits.shape
    if token_ids.shape != (rows,):
        raise ValueError(f"token_ids must hold one id per row ({rows}), got shape "
                         f"{tuple(token_ids.shape)}")
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary")
    k = min(k, vocab)
    kb = top_bucket(k)
    dev = logits.device
    ids = token_ids.to(dev, torch.int64)
    lp = torch.empty(rows, dtype=torch.float32, device=dev)
    rank = torch.empty(rows, dtype=torch.int64, device=dev)
    top_lp = torch.empty(rows, kb, dtype=torch.float32, device=dev)
    top_ids = torch.empty(rows, kb, dtype=torch.int64, device=dev)
    if rows:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        block = max(min(block, triton.next_power_of_2(vocab)), kb)
        chunks = triton.cdiv(vocab, block)
        pmax = torch.empty(rows, chunks, dtype=torch.float32, device=dev)
        psum = torch.empty_like(pmax)
        pcount = torch.empty(rows, chunks, dtype=torch.int32, device=dev)
        pvals = torch.empty(rows, chunks, kb, dtype=torch.float32, device=dev)
        pids = torch.empty(rows, chunks, kb, dtype=torch.int32, device=dev)
        big = 2**31 - 1
        _chunk_kernel[(rows, chunks)](logits, logits.stride(0), ids, pmax, psum, pcount, pvals,
                                      pids, vocab, chunks, K=kb, BLOCK=block, BIG=big)
        _merge_kernel[(rows,)](logits, logits.stride(0), ids, pmax, psum, pcount, pvals, pids, lp,
                               rank, top_lp, top_ids, chunks, K=kb,
                               PB=triton.next_power_of_2(chunks), BIG=big)
    return LogprobTensors(ids, lp, rank, top_ids[:, :k], top_lp[:, :k])
