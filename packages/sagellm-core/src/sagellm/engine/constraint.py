"""Token constraints (structured output) as the engine sees them: a per-request object that says,
through a bitmask, which tokens may come next, and follows the tokens actually chosen.

The grammar engine lives in ``sagellm.structured``; this module is the contract it meets and the
device-side mask. Who calls what, each step:

* the model runner calls :meth:`TokenConstraint.fill_bitmask` for each sampling row whose
  sequence has a constraint (it only reads the constraint's state, so a step the engine reruns
  after a failure fills the same mask), then :func:`apply_token_bitmask` before any sampling,
  greedy included;
* the engine calls :meth:`TokenConstraint.accept_token` once the token is committed to the
  sequence (in ``LLMEngine._advance``, never twice for one token), fails that request alone if
  it returns ``False``, and finishes it with ``finish_reason == "stop"`` once
  :meth:`TokenConstraint.is_terminated` is true.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row ``row`` of ``bitmask`` (int32, CPU, ``[rows, bitmask_words(vocab)]``): bit
        ``j`` of word ``w`` set means token ``32 * w + j`` is allowed next."""
        ...

    def accept_token(self, token_id: int) -> bool:
        """Advance past ``token_id``; ``False`` if it was not allowed (the request then fails)."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete: the request finishes (``finish_reason == "stop"``)."""
        ...


# After the Protocol: ``sagellm.structured`` re-exports it, so importing this module first (which
# loads ``sagellm.structured`` for the bit packing) finds it already defined.
from sagellm.structured.bitmask import bitmask_words, unpack_bitmask  # noqa: E402

#: What ``LLMEngine.add_request(..., constraint=...)`` takes: called once per choice (so ``n > 1``
#: gives each its own state) when the request is added.
ConstraintFactory = Callable[[], TokenConstraint]


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-disallowed bitmask on the CPU, for :meth:`TokenConstraint.fill_bitmask`."""
    return torch.zeros((rows, bitmask_words(vocab_size)), dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set to ``-inf``, in place, the logits of tokens the bitmask disallows.

    Row ``i`` of ``bitmask`` applies to row ``rows[i]`` of ``logits`` ``[N, V]``. The mask is
    moved to the logits' device and unpacked there with shifts (no loop over the vocabulary).
    """
    # A mask narrower than padded logits leaves the padding disallowed.
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    rows = rows.to(logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
