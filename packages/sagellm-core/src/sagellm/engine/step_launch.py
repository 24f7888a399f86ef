"""A step queued on the device whose sampled tokens are not on the host yet.

With asynchronous scheduling the engine plans and queues step N+1 while step N still runs: the
token step N samples for a sequence is then not known when step N+1's inputs are built. The
engine appends :data:`PENDING_TOKEN` in its place; the runner takes that input from step N's
sampled ids on the device (:func:`patch_pending`), and the engine writes the real token over the
placeholder when step N's :meth:`StepLaunch.result` comes back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sagellm.engine.sequence import SequenceState
from sagellm.layers.step_tensors import step_tensor

#: Stands for a token a queued step has sampled but the host has not seen yet (never a real id).
PENDING_TOKEN = -1


@dataclass
class StepLaunch:
    """One queued step: its sampling rows ``seqs`` (``plan.sampling_seqs()`` order), their
    sampled ids still on the device (``ids``, one per row; ``None`` when no row samples), and
    the wait that brings them (with their logprobs) to the host."""

    seqs: list[SequenceState]
    ids: torch.Tensor | None
    _wait: Callable[[], list[int]] = field(repr=False)
    _result: list[int] | None = field(default=None, repr=False)
    #: The next step's mask fill may wait for the tokens on its worker thread.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rows: dict[str, int] | None = field(default=None, repr=False)

    @classmethod
    def done(cls, seqs: list[SequenceState], tokens: list[int]) -> StepLaunch:
        """A step whose tokens are already on the host (a synchronous runner's)."""
        return cls(seqs, None, lambda: tokens)

    def result(self) -> list[int]:
        """The sampled tokens, one per row of ``seqs``: waits for the device the first time."""
        with self._lock:
            if self._result is None:
                self._result = self._wait()
            return self._result

    def row_of(self) -> dict[str, int]:
        """Row of each sampling sequence, by request id (built once; several consumers of the
        next step read it)."""
        if self._rows is None:
            self._rows = {s.request_id: i for i, s in enumerate(self.seqs)}
        return self._rows


def pending_rows(tokens: Sequence[int]) -> list[int]:
    """Indices of ``tokens`` that are :data:`PENDING_TOKEN`."""
    return [i for i, t in enumerate(tokens) if t == PENDING_TOKEN]


def patch_pending(input_ids: torch.Tensor, rows: list[int], seqs: list[SequenceState],
                  prev: StepLaunch | None) -> None:
    """Write, on the device, into ``input_ids[rows[i]]`` the token ``prev`` sampled for
    ``seqs[i]`` (the owner of that row, whose input there is :data:`PENDING_TOKEN`).

    Queued behind ``prev`` on the same stream, so it reads the ids once they are written, with
    no wait on the host. A pending token of a step other than ``prev`` cannot be patched: the
    engine keeps at most one step in flight, and fills every placeholder before planning on."""
    if not rows:
        return
    if prev is None or prev.ids is None:
        raise RuntimeError("a step's input holds a pending token but no queued step sampled it")
    where = prev.row_of()
    try:
        src = [where[s.request_id] for s in seqs]
    except KeyError as exc:
        raise RuntimeError(f"pending token of {exc.args[0]} was not sampled by the queued step"
                           ) from None
    n = len(rows)
    if rows == list(range(rows[0], rows[0] + n)) and src == list(range(src[0], src[0] + n)):
        # The steady decode batch: the same sequences in the same order, one slice copy.
        input_ids[rows[0]:rows[0] + n].copy_(prev.ids[src[0]:src[0] + n])
        return
    index = step_tensor(rows + src, torch.int64, input_ids.device)
    picked = prev.ids.index_select(0, index[n:]).to(input_ids.dtype)
    input_ids.index_copy_(0, index[:n], picked)
