"""Per-request adjustments of the logits before sampling: penalties and logit bias, batched.

Each function works on the rows of a step that ask for it (``rows`` indexes the logits), in
place, with a handful of tensor operations whatever the batch or vocabulary size.

The engine carries the counts from step to step (``sagellm.engine.token_count_cache``);
:func:`token_counts` builds them from scratch, for tests and for comparison.
"""

from __future__ import annotations

import torch

from sagellm.layers.step_tensors import step_tensor


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[len(token_ids), vocab_size]`` float32 counts of each row's ids, built on ``device``."""
    counts = torch.zeros((len(token_ids), vocab_size), dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_ids]
    total = sum(lengths)
    if total == 0:
        return counts
    flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
    row_of = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor(lengths))
    index = (row_of * vocab_size + flat).to(device, non_blocking=True)
    counts.view(-1).scatter_add_(0, index, torch.ones(total, device=device))
    return counts


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor | None, output_counts: torch.Tensor,
                    seen: torch.Tensor | None, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor | None) -> None:
    """Penalise, in place, the logits of ``rows`` (``None``: every row, without a gather).

    ``output_counts`` [R, V]: each token's count among the generated tokens of row ``rows[i]``;
    ``seen`` [R, V] bool: the token occurs in the prompt or output (for ``repetition``, ``None``
    when no row has one). Repetition (Hugging Face): a seen token's logit is divided by the
    penalty if positive and multiplied by it if not. Then frequency and presence (OpenAI):
    ``logit -= frequency * count + presence * (count > 0)``.
    """
    x = logits if rows is None else logits.index_select(0, rows)
    if repetition is not None and seen is not None:
        r = repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    # ``sign`` of the counts (never negative) is ``count > 0`` as 1.0 / 0.0 in one launch; the
    # last subtraction writes the logits' rows directly when they are all of them.
    x = x - frequency[:, None] * output_counts
    penalty = presence[:, None] * output_counts.sign()
    if rows is None:
        torch.sub(x, penalty, out=logits)
    else:
        logits.index_copy_(0, rows, x - penalty)


def apply_logit_bias(logits: torch.Tensor, rows: list[int], token_ids: list[int],
                     biases: list[float]) -> None:
    """Add ``biases[j]`` to ``logits[rows[j], token_ids[j]]``, in place, in one indexed add
    (no wait for the device)."""
    if not rows:
        return
    dev = logits.device
    index = (step_tensor(rows, torch.int64, dev), step_tensor(token_ids, torch.int64, dev))
    logits.index_put_(index, step_tensor(biases, logits.dtype, dev), accumulate=True)
