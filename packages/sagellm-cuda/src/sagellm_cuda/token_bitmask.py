"""Structured-output masks applied to the logits in one Triton launch, in place.

Core's torch version (``sagellm.engine.constraint.apply_token_bitmask``) unpacks the packed
words into a boolean ``[rows, vocab]`` tensor with shifts, then masks, gathers and scatters: six
to eight launches and a boolean tensor as large as the logits. Here each program reads one
block of a row's words and writes ``-inf`` over the disallowed logits of that block; it never
reads the logits, and a row index lets it mask the constrained rows of a batch where they lie.
Tokens past the mask's ``32 * words`` (a padded vocabulary) are disallowed, as in core.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Logits per program (a multiple of 32: each program reads whole words).
BLOCK = 2048


@triton.jit
def _apply_bitmask_kernel(logits_ptr, mask_ptr, rows_ptr, vocab, words, logits_stride,
                          mask_stride, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    in_vocab = cols < vocab
    w = cols // 32
    word = tl.load(mask_ptr + i.to(tl.int64) * mask_stride + w, mask=in_vocab & (w < words),
                   other=0)
    allowed = ((word >> (cols % 32)) & 1) != 0
    tl.store(logits_ptr + row * logits_stride + cols, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor,
                               rows: torch.Tensor | None = None) -> None:
    """Set to ``-inf``, in place, the logits ``[R, V]`` (float, last dim contiguous) that the
    int32 ``bitmask`` ``[N, words]`` (on the host or the logits' device) disallows: row ``i``
    of the mask applies to logits row ``rows[i]`` (an int64 index, ``N`` long), or to row ``i``
    when ``rows`` is ``None`` (then ``N <= R``). Row indices are not checked on the device:
    core's caller builds them from its own row list."""
    if logits.dim() != 2 or not logits.is_floating_point() or logits.stride(1) != 1:
        raise ValueError(f"logits must be a 2-D float tensor with a contiguous last dim, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"the bitmask must be a 2-D int32 tensor, got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    n, words = bitmask.shape
    num_rows, vocab = logits.shape
    if rows is None:
        if n > num_rows:
            raise ValueError(f"the bitmask has {n} rows, the logits only {num_rows}")
    elif rows.dim() != 1 or rows.numel() != n or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 index of {n} rows (one per bitmask row), got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    if n == 0:
        return
    dev = logits.device
    mask = bitmask.to(dev, non_blocking=True)
    if mask.stride(1) != 1:
        mask = mask.contiguous()
    index = mask if rows is None else rows.to(dev, non_blocking=True)
    grid = (n, triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](logits, mask, index, vocab, words, logits.stride(0),
                                mask.stride(0), HAS_ROWS=rows is not None, BLOCK=BLOCK)
