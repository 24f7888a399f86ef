"""The structured-output masks of one step, filled on a worker thread while the runner prepares
the step's inputs and launches its forward.

The contract, step by step:

* the runner calls :func:`begin_mask_fill` with the rows that will sample, before it builds
  inputs or launches anything. The engine has accepted the previous step's tokens by then,
  except with asynchronous scheduling, where a row's last token may still be pending on the
  step queued before (``prev``): the worker then waits for that step's tokens and lets the
  constraint accept the row's token first (``SequenceState.num_accepted_tokens`` and
  ``constraint_done`` say so to the engine, ``constraint_error`` holds a refusal), so each
  constraint's state is the one this step's token must follow. It then sets the row's
  ``accept_ready`` event, which the engine waits for before it looks at the constraint: from
  then on the worker only reads the constraint to fill its mask, and the engine does not touch
  it until the next fill has accepted;
* it hands the returned :class:`MaskFill` to ``ModelRunner.sample_tokens`` for exactly those
  rows (or a subset of them with the same constrained rows), which calls :meth:`MaskFill.take`;
  ``take`` checks that the constrained rows are the same sequences, constraints and lengths the
  fill began with and returns the bitmask; a fill is taken at most once. With a ``device_wait``
  (``ModelRunner.queue_mask_wait``: the device can wait for a host flag word) the host does not
  wait: the device's stream waits until the worker has written :attr:`BitmaskPool.flag` past
  the fill's ticket, so the copy of the mask queued after it reads the finished mask, and the
  host goes on to the next step while the worker fills. Without one, ``take`` waits for the
  fill on the host;
* the runner leaves the ``with`` block of the fill before its step ends, normally or not, so a
  fill that was never taken (a step that raised) has finished writing before anything reuses
  its buffer (a fill the device waits for is released at once: its buffer's next user waits
  for the copy, which comes after the worker's flag). Nothing survives the step: a step the
  engine reruns begins a new fill.

A fill never raises to the step: a row whose grammar fails to fill (or whose pending token
could not be fetched) allows every token and gets a ``constraint_error``, so that request alone
fails when the engine sees its next token, and the worker always writes its flag.

The host buffers come from a :class:`BitmaskPool`: four page-locked buffers used in turn, each
reused only after the device event recorded behind the copy that last read it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np
import torch

from sagellm.engine.constraint import fill_bitmasks, refusal
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch
from sagellm.protocols import DeviceEvent, Platform
from sagellm.structured.bitmask import bitmask_words

#: Host buffers per pool: a step may fill two (a prompt's graph and the decodes' graph), and
#: its successor is begun while it still runs, so four are in use before any must wait.
NUM_BUFFERS = 4


class BitmaskPool:
    """Reused host bitmasks for one runner: :data:`NUM_BUFFERS` buffers in turn, grown as
    needed (page-locked when the device is a CUDA device, so the copy to it does not wait)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.pin = platform.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * NUM_BUFFERS
        self._events: list[DeviceEvent | None] = [None] * NUM_BUFFERS
        self._held = [False] * NUM_BUFFERS
        self._next = 0
        self.num_grown = 0
        #: The worker writes here the ticket of each fill it finished (a page-locked int32
        #: word, as a 32-bit counter that wraps); a device wait compares it cyclically.
        with torch.inference_mode(False):
            self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=self.pin)
        self._flag_word = self.flag.numpy().view(np.uint32)
        self._tickets = 0

    def ticket(self) -> int:
        """The next fill's ticket (1, 2, ... modulo 2**32): the flag value that says it is done."""
        self._tickets = (self._tickets + 1) & 0xFFFFFFFF
        return self._tickets

    def mark_done(self, ticket: int) -> None:
        """The worker finished the fill of ``ticket`` (written after its mask)."""
        self._flag_word[0] = ticket

    def acquire(self, rows: int, vocab: int) -> tuple[int, torch.Tensor]:
        """``(slot, bitmask)``: a contiguous ``[rows, bitmask_words(vocab)]`` int32 view of the
        next free buffer in turn (not cleared), once no device copy reads it any more; hand
        ``slot`` back with :meth:`release`. With every buffer held, a new unpooled one (slot
        ``-1``)."""
        if rows <= 0 or vocab <= 0:
            raise ValueError(f"a bitmask needs rows > 0 and vocab > 0, got {rows} and {vocab}")
        words = bitmask_words(vocab)
        order = [(self._next + k) % NUM_BUFFERS for k in range(NUM_BUFFERS)]
        slot = next((s for s in order if not self._held[s]), -1)
        if slot < 0:
            with torch.inference_mode(False):
                return -1, torch.empty((rows, words), dtype=torch.int32, pin_memory=self.pin)
        self._next, self._held[slot] = (slot + 1) % NUM_BUFFERS, True
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


#: ``device_wait(flag, value)``: queue on the device a wait until the page-locked int32 word
#: ``flag`` reaches ``value`` (cyclically); ``False`` if it cannot (the host waits instead).
DeviceWait = Callable[[torch.Tensor, int], bool]


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
            pool.release(self.slot)
            raise RuntimeError("a constrained row's last token is pending, but no queued step "
                               "sampled it")
        self.ticket = pool.ticket()
        accepted = threading.Event()
        for s in pending:
            s.accept_ready = accepted
        try:
            self.future: Future[None] = _worker().submit(_fill, self.seqs, self.bitmask,
                                                         pending, prev, accepted, pool,
                                                         self.ticket)
        except BaseException:
            accepted.set()
            pool.release(self.slot)
            raise
        self.taken = False
        self.released = False
        #: The device waits for this fill (``take`` with a ``device_wait``), the host does not.
        self.device_waits = False

    def take(self, seqs: list[SequenceState], vocab: int,
             device_wait: DeviceWait | None = None) -> torch.Tensor:
        """The bitmask for the constrained rows of ``seqs`` (row ``i``: the ``i``-th of them):
        filled, or (with ``device_wait``, where it queues the device's wait for this fill)
        being filled, with every copy of it queued from now on reading it finished. Raises
        ``RuntimeError`` when the fill was begun for other rows or other constraint states, or
        was taken before."""
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
        if device_wait is not None and self.pool.pin and device_wait(self.pool.flag, self.ticket):
            self.device_waits = True
            return self.bitmask
        self.future.result()
        return self.bitmask

    def release(self) -> None:
        """Called once the bitmask's copy to the device is queued (or it will never be)."""
        if not self.released:
            self.released = True
            self.pool.release(self.slot)

    def join(self) -> None:
        """Wait until the worker no longer writes the buffer, or (a fill the device waits for)
        hand the buffer back at once: its next user waits for the copy queued behind that wait."""
        if self.device_waits:
            self.release()
            return
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
          prev: StepLaunch | None, accepted: threading.Event, pool: BitmaskPool,
          ticket: int) -> None:
    """The worker's job: accept the pending tokens (``prev``'s, waited for), say so
    (``accepted``), fill, then write ``ticket`` to the pool's flag, whatever happened."""
    try:
        try:
            _accept_pending(pending, prev)
        finally:
            accepted.set()
        _fill_rows(seqs, bitmask)
    finally:
        pool.mark_done(ticket)


def _accept_pending(pending: list[SequenceState], prev: StepLaunch | None) -> None:
    if not pending:
        return
    assert prev is not None
    try:
        tokens, row = prev.result(), prev.row_of()
    except Exception as exc:  # noqa: BLE001 - the step that sampled them fails its requests
        for s in pending:
            s.constraint_error = f"the previous step failed: {type(exc).__name__}: {exc}"
        return
    for s in pending:
        constraint = s.constraint
        assert constraint is not None
        try:
            tok = tokens[row[s.request_id]]
            if constraint.accept_token(tok):
                s.num_accepted_tokens += 1
                s.constraint_done = constraint.is_terminated()
            else:
                s.constraint_error = refusal(constraint, tok)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            s.constraint_error = _failed(exc)


def _failed(exc: Exception) -> str:
    """The ``constraint_error`` of a row whose grammar raised."""
    return f"the output constraint failed: {type(exc).__name__}: {exc}"


def _fill_rows(seqs: list[SequenceState], bitmask: torch.Tensor) -> None:
    """Fill every row (the live ones in one call); a row already refused, or whose grammar
    fails to fill, allows everything, and its request fails when the engine sees its token."""
    ok = [i for i, s in enumerate(seqs) if s.constraint_error is None]
    try:
        if len(ok) == len(seqs):
            fill_bitmasks([s.constraint for s in seqs], bitmask)  # type: ignore[misc]
            return
        if ok:
            part = bitmask.new_empty((len(ok), bitmask.shape[1]))
            fill_bitmasks([seqs[i].constraint for i in ok], part)  # type: ignore[misc]
            bitmask[ok] = part
    except Exception:  # noqa: BLE001 - the failing rows are found one by one
        for i in ok:
            try:
                fill_bitmasks([seqs[i].constraint], bitmask[i:i + 1])  # type: ignore[list-item]
            except Exception as exc:  # noqa: BLE001 - this request fails, the step goes on
                seqs[i].constraint_error = _failed(exc)
                bitmask[i] = -1
    for i in range(len(seqs)):
        if i not in ok:
            bitmask[i] = -1


def begin_mask_fill(pool: BitmaskPool, seqs: list[SequenceState], vocab: int,
                    prev: StepLaunch | None = None) -> MaskFill | None:
    """Start filling the masks of the constrained rows of ``seqs``; ``None`` when none is.
    ``prev``: the step queued before, which sampled the rows' pending tokens (if any)."""
    rows = constrained(seqs)
    return MaskFill(pool, rows, vocab, prev) if rows else None
