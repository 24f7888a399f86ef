"""The structured-output masks of one step, filled on a worker thread while the runner prepares
the step's inputs and launches its forward.

The contract, step by step:

* the runner calls :func:`begin_mask_fill` with the rows that will sample, before it builds
  inputs or launches anything. The engine has accepted the previous step's tokens by then,
  except with asynchronous scheduling, where a row's last token may still be pending on the
  step queued before (``prev``): the worker then waits for that step's tokens and lets the
  constraint accept the row's token first (``SequenceState.num_accepted_tokens`` says so to the
  engine, ``constraint_error`` holds a refusal), so each constraint's state is the one this
  step's token must follow;
* it hands the returned :class:`MaskFill` to ``ModelRunner.sample_tokens`` for exactly those
  rows (or a subset of them with the same constrained rows), which calls :meth:`MaskFill.take`;
  ``take`` checks that the constrained rows are the same sequences, constraints and lengths the
  fill began with, waits for it and returns the bitmask; a fill is taken at most once;
* the runner leaves the ``with`` block of the fill before its step ends, normally or not, so a
  fill that was never taken (a step that raised) has finished writing before anything reuses
  its buffer. Nothing survives the step: a step the engine reruns begins a new fill.

The host buffers come from a :class:`BitmaskPool`: two page-locked buffers used in turn, each
reused only after the device event recorded behind the copy that last read it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

from sagellm.engine.constraint import fill_bitmasks, refusal
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch
from sagellm.protocols import DeviceEvent, Platform
from sagellm.structured.bitmask import bitmask_words


class BitmaskPool:
    """Reused host bitmasks for one runner: two buffers in turn, grown as needed (page-locked
    when the device is a CUDA device, so the copy to it does not wait)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.pin = platform.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[DeviceEvent | None] = [None, None]
        self._held = [False, False]
        self._next = 0
        self.num_grown = 0

    def acquire(self, rows: int, vocab: int) -> tuple[int, torch.Tensor]:
        """``(slot, bitmask)``: a contiguous ``[rows, bitmask_words(vocab)]`` int32 view of the
        next free buffer (not cleared), once no device copy reads it any more; hand ``slot``
        back with :meth:`release`. With both buffers held, a new unpooled one (slot ``-1``)."""
        if rows <= 0 or vocab <= 0:
            raise ValueError(f"a bitmask needs rows > 0 and vocab > 0, got {rows} and {vocab}")
        words = bitmask_words(vocab)
        free = [s for s in (self._next, 1 - self._next) if not self._held[s]]
        if not free:
            with torch.inference_mode(False):
                return -1, torch.empty((rows, words), dtype=torch.int32, pin_memory=self.pin)
        slot = free[0]
        self._next, self._held[slot] = 1 - slot, True
        event, self._events[slot] = self._events[slot], None
        if event is not None:
            event.synchronize()
        buf = self._buffers[slot]
        if buf is None or buf.numel() < rows * words:
            # A normal tensor even when made in the runner's inference mode: the worker thread
            # (outside that mode) writes it.
            with torch.inference_mode(False):
                buf = torch.empty(rows * words, dtype=torch.int32, pin_memory=self.pin)
            self._buffers[slot] = buf
            self.num_grown += 1
        return slot, buf[: rows * words].view(rows, words)

    def release(self, slot: int) -> None:
        """The copies reading ``slot`` are queued (or none will be): reuse it after them
        (``Platform.record_event``; ``None`` where copies from the host finish as they return)."""
        if slot < 0:
            return
        if not self._held[slot]:
            raise RuntimeError(f"bitmask buffer {slot} released twice")
        self._events[slot] = self.platform.record_event()
        self._held[slot] = False


#: The one worker thread of the mask fills: fills run one at a time, in the order begun, so a
#: fill abandoned by a failed step has finished before the next one starts.
_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(1, thread_name_prefix="sagellm-mask-fill")
        return _WORKER


def constrained(seqs: list[SequenceState]) -> list[SequenceState]:
    return [s for s in seqs if s.constraint is not None]


class MaskFill:
    """The bitmask of a step's constrained rows, being filled on the worker thread."""

    def __init__(self, pool: BitmaskPool, seqs: list[SequenceState], vocab: int,
                 prev: StepLaunch | None = None) -> None:
        self.pool = pool
        self.vocab = vocab
        self.seqs = list(seqs)
        self.states = [(s.constraint, s.num_tokens) for s in self.seqs]
        self.slot, self.bitmask = pool.acquire(len(self.seqs), vocab)
        pending = [s for s in self.seqs if s.token_ids[-1] == PENDING_TOKEN
                   and s.num_accepted_tokens < s.num_output_tokens]
        if pending and prev is None:
            raise RuntimeError("a constrained row's last token is pending, but no queued step "
                               "sampled it")
        self.future: Future[None] = _worker().submit(_fill, self.seqs, self.bitmask, pending,
                                                     prev)
        self.taken = False
        self.released = False

    def take(self, seqs: list[SequenceState], vocab: int) -> torch.Tensor:
        """The filled bitmask for the constrained rows of ``seqs`` (row ``i``: the ``i``-th of
        them), once the fill is done; raises the fill's error, or ``RuntimeError`` when the fill
        was begun for other rows or other constraint states, or was taken before."""
        if self.taken:
            raise RuntimeError("this step's mask fill was already used")
        rows = constrained(seqs)
        same = len(rows) == len(self.seqs) and all(
            a is b and a.constraint is c and a.num_tokens == n
            for a, b, (c, n) in zip(rows, self.seqs, self.states, strict=True))
        if not same:
            raise RuntimeError(
                f"the mask fill was begun for {[s.request_id for s in self.seqs]} at lengths "
                f"{[n for _, n in self.states]}, but sampling asks for "
                f"{[s.request_id for s in rows]} at {[s.num_tokens for s in rows]}")
        if bitmask_words(vocab) != self.bitmask.shape[1]:
            raise RuntimeError(f"the mask fill was begun for {self.vocab} logits, sampling has "
                               f"{vocab}")
        self.taken = True
        self.future.result()
        return self.bitmask

    def release(self) -> None:
        """Called once the bitmask's copy to the device is queued (or it will never be)."""
        if not self.released:
            self.released = True
            self.pool.release(self.slot)

    def join(self) -> None:
        """Wait until the worker no longer writes the buffer (any error was or is not wanted)."""
        try:
            self.future.result()
        except Exception:  # noqa: BLE001 - raised by take() to the step that uses it
            pass
        self.release()

    def __enter__(self) -> MaskFill:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.join()


def _fill(seqs: list[SequenceState], bitmask: torch.Tensor, pending: list[SequenceState],
          prev: StepLaunch | None) -> None:
    """The worker's job: accept the pending tokens (``prev``'s, waited for), then fill."""
    if pending:
        assert prev is not None
        tokens, row = prev.result(), prev.row_of()
        for s in pending:
            tok = tokens[row[s.request_id]]
            constraint = s.constraint
            assert constraint is not None
            if constraint.accept_token(tok):
                s.num_accepted_tokens += 1
            else:
                s.constraint_error = refusal(constraint, tok)
    broken = [i for i, s in enumerate(seqs) if s.constraint_error is not None]
    if not broken:
        fill_bitmasks([s.constraint for s in seqs], bitmask)  # type: ignore[misc]
        return
    # A refused row samples anything (its request fails when the engine sees the refusal).
    ok = [i for i in range(len(seqs)) if i not in broken]
    if ok:
        part = bitmask.new_empty((len(ok), bitmask.shape[1]))
        fill_bitmasks([seqs[i].constraint for i in ok], part)  # type: ignore[misc]
        bitmask[ok] = part
    bitmask[broken] = -1


def begin_mask_fill(pool: BitmaskPool, seqs: list[SequenceState], vocab: int,
                    prev: StepLaunch | None = None) -> MaskFill | None:
    """Start filling the masks of the constrained rows of ``seqs``; ``None`` when none is.
    ``prev``: the step queued before, which sampled the rows' pending tokens (if any)."""
    rows = constrained(seqs)
    return MaskFill(pool, rows, vocab, prev) if rows else None
