"""Dense reference attention and paged test cases, independent of any backend.

The conformance suite checks a backend's paged kernels against :func:`dense_attention`, which
works on the full, unpaged keys and values in float64; it shares no code with
``sagellm.backends.torch_attention``, so the CPU backend is not tested against itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sagellm.protocols import FULL_ATTENTION, AttentionLayerSpec, DecodeMetadata, PrefillMetadata


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    q_offset: int, layer: AttentionLayerSpec = FULL_ATTENTION) -> torch.Tensor:
    """Causal attention of ``q`` [Lq, H, D] over ``k``/``v`` [Lk, Hkv, D] in float64.

    Query ``i`` sits at position ``p = q_offset + i`` and sees keys ``0 .. p``, or only those
    after ``p - layer.sliding_window``; scores are soft-capped by ``layer.logits_soft_cap``.
    """
    groups = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(groups, dim=1)
    v64 = v64.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    if layer.logits_soft_cap is not None:
        scores = layer.logits_soft_cap * torch.tanh(scores / layer.logits_soft_cap)
    q_pos = torch.arange(q.shape[0])[:, None] + q_offset
    k_pos = torch.arange(k.shape[0])[None, :]
    hidden = k_pos > q_pos
    if layer.sliding_window is not None:
        hidden |= k_pos <= q_pos - layer.sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)


@dataclass
class PagedCase:
    """A batch of sequences laid out in a paged pool, with everything a backend call needs.

    ``keys[i]``/``values[i]`` hold all ``seq_lens[i]`` tokens of sequence ``i``; the first
    ``context_lens[i]`` are the cached prefix, the rest are this step's new tokens.
    """

    block_size: int
    num_blocks: int
    block_tables: list[list[int]]
    seq_lens: list[int]
    context_lens: list[int]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def slots(self, i: int, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [self.block_tables[i][p // bs] * bs + p % bs for p in range(start, end)]

    def table_tensor(self, device: torch.device) -> torch.Tensor:
        width = max(len(t) for t in self.block_tables)
        rows = [t + [0] * (width - len(t)) for t in self.block_tables]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def prefill_metadata(self, device: torch.device) -> PrefillMetadata:
        q_lens = [s - c for s, c in zip(self.seq_lens, self.context_lens, strict=True)]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        i32 = dict(dtype=torch.int32, device=device)
        return PrefillMetadata(
            cu_seqlens_q=torch.tensor(cu, **i32),  # type: ignore[arg-type]
            seq_lens=torch.tensor(self.seq_lens, **i32),  # type: ignore[arg-type]
            context_lens=torch.tensor(self.context_lens, **i32),  # type: ignore[arg-type]
            block_tables=self.table_tensor(device),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(self.seq_lens),
            has_prefix=any(c > 0 for c in self.context_lens),
            seq_lens_list=list(self.seq_lens),
            context_lens_list=list(self.context_lens),
        )

    def decode_metadata(self, device: torch.device) -> DecodeMetadata:
        return DecodeMetadata(
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            block_tables=self.table_tensor(device),
            max_seq_len=max(self.seq_lens),
        )

    def expected(self, scale: float, layer: AttentionLayerSpec = FULL_ATTENTION) -> torch.Tensor:
        """Dense float64 reference for the new tokens of every sequence, concatenated."""
        outs = [dense_attention(q, k, v, scale, c, layer)
                for q, k, v, c in zip(self.queries, self.keys, self.values, self.context_lens, strict=True)]
        return torch.cat(outs)


def make_paged_case(seq_lens: list[int], context_lens: list[int], num_heads: int,
                    num_kv_heads: int, head_dim: int, block_size: int, seed: int = 0,
                    spare_blocks: int = 3) -> PagedCase:
    """Random queries/keys/values (float32, CPU) and a shuffled block table for each sequence.

    Blocks are handed out in a random order so a kernel that assumes contiguous or ordered
    blocks fails; a few spare blocks stay unused so stray writes can be detected.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables, taken = [], 0
    for n in need:
        tables.append(order[taken:taken + n])
        taken += n
    queries, keys, values = [], [], []
    for s, c in zip(seq_lens, context_lens, strict=True):
        queries.append(torch.randn(s - c, num_heads, head_dim, generator=gen))
        keys.append(torch.randn(s, num_kv_heads, head_dim, generator=gen))
        values.append(torch.randn(s, num_kv_heads, head_dim, generator=gen))
    return PagedCase(block_size, num_blocks, tables, list(seq_lens), list(context_lens),
                     queries, keys, values)
