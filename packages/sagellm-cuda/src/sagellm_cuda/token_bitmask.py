"""Structured-output masks on the device in one Triton launch: applied to the logits in place,
or (for greedy rows) folded into the argmax that picks their token (:func:`masked_argmax`).

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


def _checked(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None
             ) -> tuple[int, int, int]:
    """``(mask rows, words, vocab)`` once the kernels' inputs are checked (``ValueError``
    naming the one that is not as documented)."""
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
    return n, words, vocab


def _on_device(dev: torch.device, bitmask: torch.Tensor, rows: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask (rows contiguous) and the row index on ``dev``, copied without a wait; the index
    is the mask itself when there is none (the kernel does not read it then)."""
    mask = bitmask.to(dev, non_blocking=True)
    if mask.stride(1) != 1:
        mask = mask.contiguous()
    return mask, mask if rows is None else rows.to(dev, non_blocking=True)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor,
                               rows: torch.Tensor | None = None) -> None:
    """Set to ``-inf``, in place, the logits ``[R, V]`` (float, last dim contiguous) that the
    int32 ``bitmask`` ``[N, words]`` (on the host or the logits' device) disallows: row ``i``
    of the mask applies to logits row ``rows[i]`` (an int64 index, ``N`` long), or to row ``i``
    when ``rows`` is ``None`` (then ``N <= R``). Row indices are not checked on the device:
    core's caller builds them from its own row list."""
    n, words, vocab = _checked(logits, bitmask, rows)
    if n == 0:
        return
    mask, index = _on_device(logits.device, bitmask, rows)
    grid = (n, triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](logits, mask, index, vocab, words, logits.stride(0),
                                mask.stride(0), HAS_ROWS=rows is not None, BLOCK=BLOCK)


#: Logits per loop iteration of :func:`masked_argmax` (one program walks a whole row).
ARGMAX_BLOCK = 2048


@triton.jit
def _masked_argmax_kernel(logits_ptr, mask_ptr, rows_ptr, out_ptr, vocab, words, logits_stride,
                          mask_stride, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``i``: the index of the largest allowed logit of row ``rows[i]`` (or ``i``).
    Each lane keeps the first maximum of its columns (a strict ``>`` as the columns rise), so
    the smallest index among the lanes that hold the row's maximum is the row's first one, as
    ``torch.argmax`` gives; a row with no allowed finite logit gives 0, as it does too."""
    i = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    where = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        in_vocab = cols < vocab
        w = cols // 32
        word = tl.load(mask_ptr + i.to(tl.int64) * mask_stride + w,
                       mask=in_vocab & (w < words), other=0)
        allowed = in_vocab & (((word >> (cols % 32)) & 1) != 0)
        x = tl.load(logits_ptr + row * logits_stride + cols, mask=allowed,
                    other=float("-inf")).to(tl.float32)
        better = x > best
        best = tl.where(better, x, best)
        where = tl.where(better, cols, where)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, where, vocab), axis=0)
    tl.store(out_ptr + i, tl.where(top == float("-inf"), 0, first).to(tl.int64))


def masked_argmax(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy token of each constrained row in one launch, without masking the logits: for
    bitmask row ``i``, the index of the largest logit of logits row ``rows[i]`` (or ``i``)
    among the tokens the mask allows, the first one on a tie. Equal to applying the mask
    (:func:`apply_token_bitmask_triton`) to a float copy and taking ``argmax`` (a row with no
    allowed finite logit gives 0, as there), except that a NaN logit is never chosen. ``logits``
    ``[R, V]`` in any float dtype (last dim contiguous) are only read; ``bitmask`` int32
    ``[N, words]`` on the host (page-locked: the copy does not wait) or the device. Returns
    int64 ids ``[N]`` on the logits' device."""
    n, words, vocab = _checked(logits, bitmask, rows)
    dev = logits.device
    out = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return out
    if vocab >= 2**31:
        raise ValueError(f"masked_argmax indexes a row with int32, got {vocab} logits")
    mask, index = _on_device(dev, bitmask, rows)
    _masked_argmax_kernel[(n,)](logits, mask, index, out, vocab, words, logits.stride(0),
                                mask.stride(0), HAS_ROWS=rows is not None, BLOCK=ARGMAX_BLOCK,
                                num_warps=8)
    return out
