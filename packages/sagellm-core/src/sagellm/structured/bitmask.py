"""Token bitmasks: one bit per vocabulary entry, applied to a batch of logits on their device.

The mask is built on the CPU (the grammar engine writes it) as int32 words, 32 times smaller
than a boolean mask, and unpacked on the logits' device with shifts, so the cost per step is one
small host-to-device copy and a few vectorised kernels, on any device, without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BITS_PER_WORD = 32


def bitmask_words(vocab: int) -> int:
    """Words per bitmask row for a vocabulary of ``vocab`` tokens."""
    return (vocab + BITS_PER_WORD - 1) // BITS_PER_WORD


def allocate_bitmask(rows: int, vocab: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An int32 CPU bitmask ``[rows, ceil(vocab / 32)]`` with every token allowed.

    ``pin_memory=True`` (for a buffer the runner reuses every step) makes the copy to a CUDA
    device asynchronous.
    """
    if rows < 0 or vocab <= 0:
        raise ValueError(f"a bitmask needs rows >= 0 and vocab > 0, got {rows} and {vocab}")
    return torch.full((rows, bitmask_words(vocab)), -1, dtype=torch.int32, pin_memory=pin_memory)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: int | Sequence[int] | torch.Tensor | None = None) -> None:
    """Set the logits of disallowed tokens to ``-inf``, in place.

    ``logits`` is ``[batch, vocab]`` on any device; ``bitmask`` an int32 ``[>= batch, words]``
    tensor whose row ``r`` belongs to logits row ``r``. ``rows`` picks the rows to mask: ``None``
    all ``batch`` rows, an int ``n`` the first ``n``, or a sequence / 1-D tensor of row indices
    (the constrained requests of a mixed batch; other rows are left as they are). Tokens past
    the bitmask's ``32 * words`` (padding rows of a model's vocabulary) are disallowed.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"the bitmask must be a 2-D int32 tensor, got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    batch, vocab = logits.shape
    index = _row_index(rows, batch, bitmask.shape[0])
    if index is not None and index.numel() == 0:
        return
    words = bitmask[:batch] if index is None else bitmask.index_select(0, index)
    allowed = unpack_bitmask(words.to(logits.device, non_blocking=True), vocab)
    if index is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = index.to(logits.device)
    picked = logits.index_select(0, index)
    picked.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, picked)


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words ``[r, w]`` -> allowed flags ``[r, vocab]`` (bool) on the words' device."""
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int32)
    # An arithmetic shift of a negative word still leaves bit j in position 0.
    bits = ((words.unsqueeze(-1) >> shifts) & 1).to(torch.bool).flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    pad = torch.zeros(bits.shape[0], vocab - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


def _row_index(rows: int | Sequence[int] | torch.Tensor | None, batch: int,
               mask_rows: int) -> torch.Tensor | None:
    """Row indices as a CPU int64 tensor, or ``None`` for "all rows"; checked against both."""
    if rows is None or isinstance(rows, int):
        n = batch if rows is None else rows
        if not 0 <= n <= batch:
            raise ValueError(f"rows={n} is outside 0..{batch} (the logits' rows)")
        if n > mask_rows:
            raise ValueError(f"the bitmask has {mask_rows} rows; {n} are needed")
        return None if n == batch else torch.arange(n)
    index = torch.as_tensor(rows, dtype=torch.int64).flatten().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= min(batch, mask_rows)):
        raise ValueError(f"row indices must lie in 0..{min(batch, mask_rows) - 1} "
                         f"(logits have {batch} rows, the bitmask {mask_rows})")
    return index
