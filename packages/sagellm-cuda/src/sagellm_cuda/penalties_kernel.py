"""Presence, frequency and repetition penalties on the logits in one Triton launch, in place.

Core's torch version (``sagellm.layers.logits_processors.apply_penalties``) runs as eight to
twelve launches (a gather of the penalised rows, two nested ``where`` for repetition, products
with the counts, their sign, subtractions, a scatter back), each reading or writing a
``[rows, vocab]`` float32 temporary: at 16 rows of a 152k vocabulary that is some 10 MB a pass
and most of a feature's cost per decode step. Here each program reads one block of a row's
logits, counts and seen flags once, applies all three penalties in registers (float32) and
writes the logits back where they lie (a row index reaches the penalised rows of a batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Logits per program.
BLOCK = 2048


# The row index and the per-row penalty vectors are read once per program: their addresses'
# alignment (they may be views at any offset) is not specialised on, so that no step compiles
# a variant of its own (``jit_watch.py``).
@triton.jit(do_not_specialize_on_alignment=["rows_ptr", "presence_ptr", "frequency_ptr",
                                            "repetition_ptr"])
def _penalties_kernel(logits_ptr, counts_ptr, seen_ptr, rows_ptr, presence_ptr, frequency_ptr,
                      repetition_ptr, vocab, logits_stride, counts_stride, seen_stride,
                      HAS_ROWS: tl.constexpr, HAS_REPETITION: tl.constexpr,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < vocab
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    i64 = i.to(tl.int64)
    where = logits_ptr + row * logits_stride + cols
    x = tl.load(where, mask=ok, other=0.0).to(tl.float32)
    count = tl.load(counts_ptr + i64 * counts_stride + cols, mask=ok, other=0.0)
    if HAS_REPETITION:
        r = tl.load(repetition_ptr + i).to(tl.float32)
        seen = tl.load(seen_ptr + i64 * seen_stride + cols, mask=ok, other=0) != 0
        x = tl.where(seen, tl.where(x > 0, x / r, x * r), x)
    presence = tl.load(presence_ptr + i).to(tl.float32)
    frequency = tl.load(frequency_ptr + i).to(tl.float32)
    x = x - frequency * count - presence * (count > 0).to(tl.float32)
    tl.store(where, x.to(logits_ptr.dtype.element_ty), mask=ok)


def apply_penalties_triton(logits: torch.Tensor, rows: torch.Tensor | None,
                           output_counts: torch.Tensor, seen: torch.Tensor | None,
                           presence: torch.Tensor, frequency: torch.Tensor,
                           repetition: torch.Tensor | None) -> None:
    """Core's ``apply_penalties`` (same arguments, same result up to float32 rounding) as one
    launch: ``logits`` ``[B, V]`` float, last dim contiguous; row ``i`` of ``output_counts``
    (float32 ``[R, V]``), ``seen`` (bool ``[R, V]``, needed with ``repetition``) and of the
    three ``[R]`` penalty vectors applies to logits row ``rows[i]`` (int64, ``R`` long), or to
    row ``i`` when ``rows`` is ``None`` (then ``R == B``). Row indices are not checked on the
    device: core's caller builds them from its own row list."""
    if logits.dim() != 2 or not logits.is_floating_point() or logits.stride(1) != 1:
        raise ValueError(f"logits must be a 2-D float tensor with a contiguous last dim, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    num_rows, vocab = logits.shape
    n = output_counts.shape[0]
    if output_counts.dtype != torch.float32 or output_counts.shape != (n, vocab) \
            or output_counts.stride(1) != 1:
        raise ValueError(f"output_counts must be float32 [R, {vocab}] with a contiguous last "
                         f"dim, got {output_counts.dtype} {tuple(output_counts.shape)}")
    if rows is None:
        if n != num_rows:
            raise ValueError(f"without rows the counts need {num_rows} rows, got {n}")
    elif rows.dim() != 1 or rows.numel() != n or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 index of {n} rows (one per count row), got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    for name, t in (("presence", presence), ("frequency", frequency),
                    ("repetition", repetition)):
        if t is not None and (t.dim() != 1 or t.numel() != n):
            raise ValueError(f"{name} must hold one value per penalised row ({n}), got "
                             f"{tuple(t.shape)}")
    has_rep = repetition is not None
    if has_rep:
        if seen is None or seen.dtype != torch.bool or seen.shape != (n, vocab) \
                or seen.stride(1) != 1:
            raise ValueError("repetition needs seen, a bool [R, V] tensor with a contiguous "
                             "last dim")
    if n == 0 or vocab == 0:
        return
    seen_arg = seen.view(torch.uint8) if has_rep else output_counts  # type: ignore[union-attr]
    _penalties_kernel[(n, triton.cdiv(vocab, BLOCK))](
        logits, output_counts, seen_arg, rows if rows is not None else output_counts,
        presence.contiguous(), frequency.contiguous(),
        repetition.contiguous() if has_rep else presence,  # type: ignore[union-attr]
        vocab, logits.stride(0), output_counts.stride(0), seen_arg.stride(0),
        HAS_ROWS=rows is not None, HAS_REPETITION=has_rep, BLOCK=BLOCK)
