"""Reference attention over the paged pool in plain torch.

Correct on every device torch supports and the numerical reference for faster kernels: each
backend's conformance tests compare against this module. With a sliding window it reads only
the blocks from the window start of each sequence's first query on, so entries the engine
freed (``NO_BLOCK``) are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm.protocols import (
    FULL_ATTENTION,
    AttentionBackend,
    AttentionLayerSpec,
    DecodeMetadata,
    PrefillMetadata,
)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: ``[length, kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, scale: float, soft_cap: float | None) -> torch.Tensor:
    """``q`` [..., H, Lq, D] over ``k``/``v`` [..., H, Lk, D]; ``mask`` True where a key is seen."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None, scale=scale)
    # SDPA has no soft-cap: the scores are materialised (fine for the reference path).
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    if mask is None and causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Lq, Lk] True where key ``k_pos`` is causal for ``q_pos`` and inside the window."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool, scale: float, soft_cap: float | None = None) -> torch.Tensor:
    # q: [Lq, H, D], k/v: [Lk, Hkv, D] -> [Lq, H, D]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = _attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, causal, scale,
                  soft_cap)
    return out.transpose(0, 1)


class TorchAttentionBackend(AttentionBackend):
    name = "torch-sdpa"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping):  # type: ignore[override]
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        key_cache.view(-1, *key_cache.shape[2:])[slot_mapping.long()] = key.to(key_cache.dtype)
        value_cache.view(-1, *value_cache.shape[2:])[slot_mapping.long()] = value.to(value_cache.dtype)

    def prefill(self, query, key, value, key_cache, value_cache, meta: PrefillMetadata, scale,  # type: ignore[override]
                layer: AttentionLayerSpec = FULL_ATTENTION):
        out = torch.empty_like(query)
        window, cap = layer.sliding_window, layer.logits_soft_cap
        cu = meta.cu_seqlens_q.tolist()
        seq_lens = meta.seq_lens_list or meta.seq_lens.tolist()
        ctx_lens = meta.context_lens_list or meta.context_lens.tolist()
        for i in range(len(seq_lens)):
            s, e = cu[i], cu[i + 1]
            q = query[s:e]
            if ctx_lens[i] == 0:
                mask = None
                if window is not None and e - s > window:
                    pos = torch.arange(e - s, device=q.device)
                    mask = _window_mask(pos, pos, window)
                out[s:e] = _sdpa(q, key[s:e], value[s:e], mask, True, scale, cap)
                continue
            # With a window, start at the block of the first query's first key.
            first = 0 if window is None else max(0, ctx_lens[i] - window + 1) // key_cache.shape[1]
            start = first * key_cache.shape[1]
            table = meta.block_tables[i][first:]
            k = gather_kv(key_cache, table, seq_lens[i] - start).to(q.dtype)
            v = gather_kv(value_cache, table, seq_lens[i] - start).to(q.dtype)
            q_pos = torch.arange(ctx_lens[i], seq_lens[i], device=q.device)
            k_pos = torch.arange(start, seq_lens[i], device=q.device)
            out[s:e] = _sdpa(q, k, v, _window_mask(q_pos, k_pos, window), False, scale, cap)
        return out

    def decode(self, query, key_cache, value_cache, meta: DecodeMetadata, scale,  # type: ignore[override]
               layer: AttentionLayerSpec = FULL_ATTENTION):
        # Batched: gather every sequence's blocks into a padded [B, L, Hkv, D] and mask the tail.
        bsz = query.shape[0]
        block_size = key_cache.shape[1]
        max_blocks = (meta.max_seq_len + block_size - 1) // block_size
        seq_lens = meta.seq_lens[:, None].to(query.device).long()
        window = layer.sliding_window
        if window is None:
            idx = torch.arange(max_blocks, device=query.device)[None, :].expand(bsz, -1)
            tables = meta.block_tables[:, :max_blocks].long()
        else:
            # Each row's blocks from the one of its first key (``seq_len - window``) on; past a
            # row's last block its last block is read again (masked), never another's entry.
            width = min(max_blocks, -(-window // block_size) + 1)
            first = (seq_lens - window).clamp(min=0) // block_size
            idx = first + torch.arange(width, device=query.device)[None, :]
            last = (seq_lens - 1) // block_size
            tables = meta.block_tables.long().gather(1, torch.minimum(idx, last))
        span = tables.shape[1] * block_size
        k = key_cache[tables].reshape(bsz, span, *key_cache.shape[2:])
        v = value_cache[tables].reshape(bsz, span, *value_cache.shape[2:])
        k, v = k.to(query.dtype), v.to(query.dtype)
        groups = query.shape[1] // k.shape[2]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        offset = torch.arange(block_size, device=query.device)
        pos = (idx[:, :, None] * block_size + offset).reshape(bsz, span)  # [B, L] positions
        mask = pos < seq_lens
        if window is not None:
            mask &= pos >= seq_lens - window
        out = _attend(query.unsqueeze(2),  # [B, H, 1, D]
                      k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :], False, scale,
                      layer.logits_soft_cap)
        return out.squeeze(2)
