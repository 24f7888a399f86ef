"""Attention written from scratch against the contract: loops over sequences, easy to read.

A real backend replaces the bodies with its device's kernels; the shapes and the meaning of
every metadata field stay the same (see ``sagellm.protocols``).
"""

from __future__ import annotations

import torch

from sagellm.protocols import AttentionBackend, DecodeMetadata, PrefillMetadata


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` [Lq, H, D] over ``k``/``v`` [Lk, Hkv, D]; query i sees keys up to Lk - Lq + i."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    offset = k.shape[0] - q.shape[0]
    visible = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def _read(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from the paged pool."""
    block_size = cache.shape[1]
    blocks = table[: -(-length // block_size)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


class ExampleAttention(AttentionBackend):
    name = "example-loops"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        block_size = key_cache.shape[1]
        keep = slot_mapping >= 0  # negative slots mean "padding, do not write"
        slots = slot_mapping[keep].long()
        key_cache[slots // block_size, slots % block_size] = key[keep].to(key_cache.dtype)
        value_cache[slots // block_size, slots % block_size] = value[keep].to(value_cache.dtype)

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, meta: PrefillMetadata,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        cu = meta.cu_seqlens_q.tolist()
        for i, total in enumerate(meta.seq_lens.tolist()):
            start, end = cu[i], cu[i + 1]
            if meta.context_lens_list and meta.context_lens_list[i] == 0:
                k, v = key[start:end], value[start:end]  # no prefix: the new tokens are all
            else:
                k = _read(key_cache, meta.block_tables[i], total)
                v = _read(value_cache, meta.block_tables[i], total)
            out[start:end] = _attend(query[start:end], k, v, scale)
        return out

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               meta: DecodeMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        for i, total in enumerate(meta.seq_lens.tolist()):
            k = _read(key_cache, meta.block_tables[i], total)
            v = _read(value_cache, meta.block_tables[i], total)
            out[i] = _attend(query[i : i + 1], k, v, scale)[0]
        return out
