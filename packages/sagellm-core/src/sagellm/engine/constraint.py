"""Token constraints (structured output) as the engine sees them: a per-request object that says,
through a bitmask, which tokens may come next, and follows the tokens actually chosen.

The grammar engine lives in ``sagellm.structured``; this module is the contract it meets and the
device-side mask. Who calls what, each step:

* the model runner calls :meth:`TokenConstraint.fill_bitmask` for each sampling row whose
  sequence has a constraint (it only reads the constraint's state, so a step the engine reruns
  after a failure fills the same mask), then :func:`apply_token_bitmask` before any sampling,
  greedy included. It does so through :func:`fill_bitmasks`, after the step's forward is queued
  on the device and before its first wait, so the masks are computed while the device runs;
  a constraint class with a ``fill_bitmask_batch(constraints, bitmask, rows)`` classmethod
  fills all of its rows in one call (the grammar engine's parallel fill). The runner begins that
  fill on a worker thread before it builds the step's inputs (``sagellm.engine.mask_fill``), so
  ``fill_bitmask`` may run on another thread than the engine's, never at the same time as
  another call on the same constraint. The rows it gets are reused buffers: they are cleared first unless the class
  sets ``fills_whole_bitmask_row = True`` (it then writes every word of its row);
* the engine calls :meth:`TokenConstraint.accept_token` once the token is committed to the
  sequence (in ``LLMEngine._advance``, never twice for one token), fails that request alone if
  it returns ``False``, and finishes it with ``finish_reason == "stop"`` once
  :meth:`TokenConstraint.is_terminated` is true (asked right after each ``accept_token``, by
  the same thread). With asynchronous scheduling the next step's mask-fill worker may be the one
  that calls both for a token still pending on the host (just before it fills that row's next
  mask); the engine then calls neither again for that token (``SequenceState.num_accepted_tokens``,
  ``constraint_done``), and fails the request if it refused.
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


def refusal(constraint: TokenConstraint, token_id: int) -> str:
    """Why a request fails when ``constraint`` refused ``token_id`` (its ``error``, if any)."""
    why = getattr(constraint, "error", None)
    return (f"token {token_id} is not allowed by the request's output constraint"
            + (f" ({why})" if why else ""))


#: What ``LLMEngine.add_request(..., constraint=...)`` takes: called once per choice (so ``n > 1``
#: gives each its own state) when the request is added.
ConstraintFactory = Callable[[], TokenConstraint]


def new_bitmask(rows: int, vocab_size: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An all-disallowed bitmask on the CPU, for :meth:`TokenConstraint.fill_bitmask`
    (``pin_memory``: page-locked, so its copy to a CUDA device does not wait)."""
    return torch.zeros((rows, bitmask_words(vocab_size)), dtype=torch.int32, pin_memory=pin_memory)


def fill_bitmasks(constraints: list[TokenConstraint], bitmask: torch.Tensor) -> None:
    """Fill row ``i`` of ``bitmask`` (any contents) from ``constraints[i]``: one
    ``fill_bitmask_batch`` call per constraint class that has one, ``fill_bitmask`` for the
    others; a row is cleared first unless its class writes all of it."""
    if len(constraints) > bitmask.shape[0]:
        raise ValueError(f"{len(constraints)} constraints for a bitmask of {bitmask.shape[0]} rows")
    batched: dict[type, list[int]] = {}
    for i, c in enumerate(constraints):
        if not getattr(type(c), "fills_whole_bitmask_row", False):
            bitmask[i].zero_()
        if callable(getattr(type(c), "fill_bitmask_batch", None)):
            batched.setdefault(type(c), []).append(i)
        else:
            c.fill_bitmask(bitmask, i)
    for cls, rows in batched.items():
        cls.fill_bitmask_batch([constraints[i] for i in rows], bitmask, rows)  # type: ignore[attr-defined]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor | None) -> None:
    """Set to ``-inf``, in place, the logits of tokens the bitmask disallows.

    Row ``i`` of ``bitmask`` applies to row ``rows[i]`` of ``logits`` ``[N, V]`` (``rows``: an
    index on any device; ``None``: row ``i`` of the logits). The mask is moved to the logits'
    device and unpacked there with shifts (no loop over the vocabulary, no wait for the device
    when ``bitmask`` is page-locked).
    """
    # A mask narrower than padded logits leaves the padding disallowed.
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = rows.to(logits.device, non_blocking=True)
    logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(~allowed, float("-inf")))
