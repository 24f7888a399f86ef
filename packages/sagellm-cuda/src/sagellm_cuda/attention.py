"""Paged attention in Triton: KV write, prefill over a cached prefix, and split-K decode (GQA).

Layout of the pool (one key and one value tensor per layer): ``[num_blocks, block_size,
num_kv_heads, head_dim]``. A token's slot is ``block * block_size + offset``.

Decode is flash-decoding: the grid is ``(batch, kv_heads, splits)``; every program holds the
queries of all heads that share one KV head (GQA group, padded to 16 rows so the dot runs on
the tensor cores) and walks its share of the context in tiles of ``BLOCK_N`` tokens; a second
kernel merges the splits by their log-sum-exp. The split count depends only on the batch size and
the longest context the caller declares, never on the data, so the launch can be captured in a
CUDA graph. With one split the first kernel writes the output directly.

Prefill is a flash-attention forward whose keys and values come from the paged pool (they were
written just before), so one kernel serves prompts with and without a cached prefix.

With a sliding window neither kernel loads a block-table entry or slot before the window start
of a program's first query, so the blocks the engine freed there (``NO_BLOCK`` entries) are
never touched (``Capabilities.skips_out_of_window_blocks``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm.protocols import (
    FULL_ATTENTION,
    AttentionBackend,
    AttentionLayerSpec,
    DecodeMetadata,
    PrefillMetadata,
)

#: Programs to aim for per decode launch (a few per SM keeps the memory system busy).
_TARGET_PROGRAMS = 2 * 132


def _tl_precision(dtype: torch.dtype) -> str:
    # fp32 models are test references: keep their dots exact instead of tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _scores(qk, scale_log2, soft_cap, HAS_CAP: tl.constexpr):
    """Raw dot products -> scores in the log2 domain, soft-capped (``cap * tanh(s / cap)`` on
    the natural-scale score ``s``) when ``HAS_CAP``."""
    if HAS_CAP:
        s = qk * (scale_log2 * 0.6931471805599453)
        # tanh through exp: exact at both tails (exp overflowing to inf gives 1).
        t = 1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0)
        return t * (soft_cap * 1.4426950408889634)
    else:
        return qk * scale_log2


# ----------------------------------------------------------------------------------------------
# KV write
# ----------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     c_stride_slot, c_stride_h,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # The slot test is broadcast to a full block tensor (not a scalar), so every Triton version's
    # interpreter accepts the mask too.
    valid = (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0
    mask = (h < NUM_HEADS) & (d < HEAD_DIM) & valid
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * k_stride_t + h * k_stride_h + d, mask=mask)
    v = tl.load(v_ptr + t64 * v_stride_t + h * v_stride_h + d, mask=mask)
    dst = slot * c_stride_slot + h * c_stride_h + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` [T, Hkv, D] at ``slot_mapping`` [T]; negative slots are skipped."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        num_heads * head_dim, head_dim,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if num_heads * head_dim <= 512 else 4,
    )


# ----------------------------------------------------------------------------------------------
# Decode: split-K over the context, all heads of one GQA group per program
# ----------------------------------------------------------------------------------------------


# Arguments that change from step to step (the block table's width, the split count) are not
# specialised on (Triton would otherwise compile a variant per value class: 1, a multiple of
# 16, other) so that a step of a new shape never waits for a compile (``jit_watch.py``).
@triton.jit(do_not_specialize=["bt_stride", "num_splits"])
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seqlen_ptr, out_ptr, part_o_ptr,
                         part_lse_ptr, scale_log2, soft_cap, window,
                         q_stride_b, q_stride_h, o_stride_b, o_stride_h, bt_stride,
                         c_stride_blk, c_stride_tok, c_stride_h, num_splits,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                         HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    # With a window the splits share only the tiles from the window's first key on.
    first_key = seq_len * 0
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)
    first_tile = first_key // BLOCK_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
                mask=gmask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b64 * bt_stride
    for tile in range(tile_start, tile_end):
        tok = tile * BLOCK_N + n
        valid = (tok < seq_len) & (tok >= first_key)
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = blk * c_stride_blk + (tok % BLOCK_SIZE) * c_stride_tok + kvh * c_stride_h
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        qk = _scores(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION), scale_log2,
                     soft_cap, HAS_CAP)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + b64 * o_stride_b + heads[:, None] * o_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        row = (b64 * NUM_HEADS + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=gmask[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, o_stride_b, o_stride_h, num_splits,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    smask = s < num_splits
    row = (b * NUM_HEADS + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * o_stride_b + h * o_stride_h + d, out.to(out_ptr.dtype.element_ty))


def decode_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int = 64) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU, no more than tiles."""
    want = -(-_TARGET_PROGRAMS // max(1, batch * num_kv_heads))
    return max(1, min(want, -(-max_seq_len // block_n), 128))


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 scale: float, num_splits: int | None = None,
                 layer: AttentionLayerSpec = FULL_ATTENTION) -> torch.Tensor:
    """``query`` [B, H, D] -> [B, H, D] over each sequence's first ``seq_lens[b]`` cached tokens
    (the last ``layer.sliding_window`` of them when set; scores soft-capped by
    ``layer.logits_soft_cap`` when set)."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    block_size = key_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if batch == 0:
        return out
    block_n = 64 if head_dim <= 128 else 32
    window = layer.sliding_window or 0
    if num_splits is None:
        span = min(max_seq_len, window + block_n) if window else max_seq_len
        num_splits = decode_num_splits(batch, num_kv_heads, span, block_n)
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                               device=query.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * 1.4426950408889634, layer.logits_soft_cap or 1.0, window,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), num_splits,
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n, DIRECT=direct,
        PRECISION=_tl_precision(query.dtype), HAS_CAP=layer.logits_soft_cap is not None,
        HAS_WINDOW=window > 0, num_warps=4, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(batch, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Prefill: causal flash attention of the new tokens over their paged context
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["bt_stride"])  # the table's width changes per step
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_q_ptr, ctx_ptr, out_ptr, scale_log2,
                    soft_cap, window,
                    q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride,
                    c_stride_blk, c_stride_tok, c_stride_h,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    mt = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q_start
    ctx = tl.load(ctx_ptr + s)
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                mask=mmask[:, None], other=0.0)
    q_pos = ctx + m
    kvh = h // GROUP
    # Keys up to the last query of this tile; a tile past the sequence does nothing.
    end = tl.minimum(ctx + q_len, ctx + (mt + 1) * BLOCK_M)
    end = tl.where(mt * BLOCK_M < q_len, end, 0)
    # Tiles entirely below the diagonal of every query row need no causal mask.
    full_end = tl.where(mt * BLOCK_M < q_len, ctx + mt * BLOCK_M, 0)
    full_end = (full_end // BLOCK_N) * BLOCK_N
    # With a window every tile is masked, from the tile of the first query's first key on;
    # keys before that first key are not loaded at all (their blocks may have been freed, and
    # their entries hold NO_BLOCK).
    lo = full_end * 0
    first_key = full_end * 0
    if HAS_WINDOW:
        first_key = tl.maximum(ctx + mt * BLOCK_M - window + 1, 0)
        lo = (first_key // BLOCK_N) * BLOCK_N
        full_end = lo

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for start in range(lo, full_end, BLOCK_N):
        tok = start + n
        blk = tl.load(bt_row + tok // BLOCK_SIZE).to(tl.int64)
        off = blk * c_stride_blk + (tok % BLOCK_SIZE) * c_stride_tok + kvh * c_stride_h
        k = tl.load(kc_ptr + off[:, None] + d[None, :])
        qk = _scores(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION), scale_log2,
                     soft_cap, HAS_CAP)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    for start in range(full_end, end, BLOCK_N):
        tok = start + n
        valid = (tok < end) & (tok >= first_key)
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = blk * c_stride_blk + (tok % BLOCK_SIZE) * c_stride_tok + kvh * c_stride_h
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        qk = _scores(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION), scale_log2,
                     soft_cap, HAS_CAP)
        causal = (tok[None, :] <= q_pos[:, None]) & valid[None, :]
        if HAS_WINDOW:
            causal &= tok[None, :] > q_pos[:, None] - window
        qk = tl.where(causal, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Rows past the sequence see no key at all: keep them finite.
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * o_stride_t + h * o_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def paged_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  context_lens: torch.Tensor, max_seqlen_q: int, scale: float,
                  layer: AttentionLayerSpec = FULL_ATTENTION) -> torch.Tensor:
    """``query`` [T, H, D] (sequences back to back) -> [T, H, D]; keys come from the pool
    (a query at ``p`` sees ``p - layer.sliding_window < key <= p`` when the window is set)."""
    num_tokens, num_heads, head_dim = query.shape
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    num_seqs = cu_seqlens_q.shape[0] - 1
    group = num_heads // key_cache.shape[2]
    fp32 = query.dtype == torch.float32
    block_m = 64 if (fp32 or max_seqlen_q <= 64) else 128
    block_n = 32 if fp32 else 64
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * 1.4426950408889634, layer.logits_soft_cap or 1.0, layer.sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_tl_precision(query.dtype),
        HAS_CAP=layer.logits_soft_cap is not None, HAS_WINDOW=layer.sliding_window is not None,
        num_warps=8 if block_m == 128 else 4, num_stages=2,
    )
    return out


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with this package's Triton kernels (CUDA-graph safe decode), sliding
    windows and score soft-capping included."""

    name = "triton"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping):  # type: ignore[override]
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    def prefill(self, query, key, value, key_cache, value_cache, meta: PrefillMetadata, scale,  # type: ignore[override]
                layer: AttentionLayerSpec = FULL_ATTENTION):
        return paged_prefill(query, key_cache, value_cache, meta.block_tables, meta.cu_seqlens_q,
                             meta.context_lens, meta.max_seqlen_q, scale, layer)

    def decode(self, query, key_cache, value_cache, meta: DecodeMetadata, scale,  # type: ignore[override]
               layer: AttentionLayerSpec = FULL_ATTENTION):
        return paged_decode(query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                            meta.max_seq_len, scale, layer=layer)
