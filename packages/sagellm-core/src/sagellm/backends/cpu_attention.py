"""The CPU backend's attention: the torch reference, with a decode that copies less.

The reference decode (:class:`~sagellm.backends.torch_attention.TorchAttentionBackend`) gathers
every sequence's blocks into a padded ``[B, blocks x block_size]`` copy in every layer and
repeats the key/value heads for grouped-query attention, so each layer copies about four times
the batch's KV. Here, per step (the plan is worked out once, on the first layer, and reused by
the others through the metadata object they share):

* a sequence whose blocks are consecutive in the pool is attended to in place, through a view
  of the pool (no copy at all); that is the common case at batch 1, where one sequence takes
  fresh blocks in order;
* otherwise the batch is gathered once per layer by token slot, padded only to the longest
  sequence, never repeated per head: the query heads of a group become the query rows of their
  key/value head (``[B, kv_heads, group, D]``), which is exact for one query token. The gather
  is an ``index_select`` of whole token rows (``kv_heads x D`` values each) from a 2-D view of
  the pool: advanced indexing (``keys[slots]``) iterates value by value and took 4-6x longer
  (SmolLM2-135M, 8 sequences of 168 tokens, one thread: 166-258 us against 29-42 us per
  gather, two per layer).

The new keys and values go into the pool by ``index_copy_`` of whole token rows, after one
check for padding slots (the reference's three ops and two index conversions per layer).

Layers with a sliding window or a logit soft-cap (``AttentionLayerSpec``) take the reference
decode, which implements both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagellm.backends.torch_attention import TorchAttentionBackend
from sagellm.protocols import FULL_ATTENTION, AttentionLayerSpec, DecodeMetadata

_PLAN_ATTR = "_cpu_decode_plan"


@dataclass
class DecodePlan:
    block_size: int
    #: ``(first slot, length)`` per sequence when every sequence's blocks are consecutive.
    spans: list[tuple[int, int]] | None
    #: Slot of each context token, ``[B * max_len]`` row-major (0 past a sequence's end), and
    #: the ``[B, max_len]`` mask of real tokens.
    slots: torch.Tensor | None
    mask: torch.Tensor | None


def decode_plan(meta: DecodeMetadata, block_size: int) -> DecodePlan:
    """The gather plan of ``meta``, made on the first call of a step and kept on ``meta``."""
    plan = getattr(meta, _PLAN_ATTR, None)
    if plan is not None and plan.block_size == block_size:
        return plan  # type: ignore[no-any-return]
    lens = meta.seq_lens.to("cpu", torch.long)
    tables = meta.block_tables.to("cpu", torch.long)
    nblocks = (lens + block_size - 1) // block_size
    width = int(nblocks.max())
    steps = tables[:, 1:width] - tables[:, : width - 1]
    inside = torch.arange(1, width)[None, :] < nblocks[:, None]
    if bool(((steps == 1) | ~inside).all()):
        starts = (tables[:, 0] * block_size).tolist()
        plan = DecodePlan(block_size, list(zip(starts, lens.tolist())), None, None)
    else:
        max_len = int(lens.max())
        pos = torch.arange(max_len)
        mask = pos[None, :] < lens[:, None]
        slots = tables[:, pos // block_size] * block_size + pos % block_size
        dev = meta.block_tables.device
        plan = DecodePlan(block_size, None, torch.where(mask, slots, 0).flatten().to(dev),
                          mask.to(dev))
    setattr(meta, _PLAN_ATTR, plan)
    return plan


def _attend_span(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """One sequence's decode over its keys and values in place: ``q`` [Hkv, group, D] against
    ``keys``/``values`` [L, Hkv, D] -> [Hkv, group, D].

    In float32 as two ``bmm`` around a softmax: for one query token that is about twice as fast
    as ``scaled_dot_product_attention``'s CPU kernel (SmolLM2's shapes, 2 threads: 21 against
    37 us at 48 keys, 41 against 85 at 400). Other dtypes keep that kernel, which accumulates
    in float32 where a bfloat16 ``bmm`` and softmax would not."""
    k, v = keys.transpose(0, 1), values.transpose(0, 1)  # [Hkv, L, D], views
    if q.dtype == torch.float32 and k.dtype == torch.float32:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        return torch.bmm(scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale)


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu-sdpa"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping):  # type: ignore[override]
        index = slot_mapping if slot_mapping.dtype == torch.long else slot_mapping.long()
        if index.numel() and int(index.min()) < 0:  # padding rows (a runner's fixed shapes)
            keep = (index >= 0).nonzero()[:, 0]
            key, value, index = key[keep], value[keep], index[keep]
        width = key_cache.shape[2] * key_cache.shape[3]
        key_cache.view(-1, width).index_copy_(0, index, key.reshape(-1, width).to(key_cache.dtype))
        value_cache.view(-1, width).index_copy_(
            0, index, value.reshape(-1, width).to(value_cache.dtype))

    def decode(self, query, key_cache, value_cache, meta: DecodeMetadata, scale,  # type: ignore[override]
               layer: AttentionLayerSpec = FULL_ATTENTION):
        if layer != FULL_ATTENTION:
            return super().decode(query, key_cache, value_cache, meta, scale, layer=layer)
        bsz, heads, dim = query.shape
        kv_heads = key_cache.shape[2]
        plan = decode_plan(meta, key_cache.shape[1])
        q = query.view(bsz, kv_heads, heads // kv_heads, dim)
        keys = key_cache.view(-1, kv_heads, dim)
        values = value_cache.view(-1, kv_heads, dim)
        if plan.spans is not None:
            if len(plan.spans) == 1:
                start, length = plan.spans[0]
                return _attend_span(q[0], keys[start:start + length],
                                    values[start:start + length], scale).view(1, heads, dim)
            out = torch.empty_like(query)
            for i, (start, length) in enumerate(plan.spans):
                out[i] = _attend_span(q[i], keys[start:start + length],
                                      values[start:start + length], scale).view(heads, dim)
            return out
        assert plan.slots is not None and plan.mask is not None
        rows = (bsz, plan.mask.shape[1], kv_heads, dim)
        k = key_cache.view(-1, kv_heads * dim).index_select(0, plan.slots).view(rows)
        v = value_cache.view(-1, kv_heads * dim).index_select(0, plan.slots).view(rows)
        k, v = k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask[:, None, None, :],
                                             scale=scale)
        return out.reshape(bsz, heads, dim)
