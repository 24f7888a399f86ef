"""One request's grammar state: the :class:`~sagellm.structured.protocol.TokenConstraint` the
sampler drives, backed by an llguidance matcher."""

from __future__ import annotations

import os
import threading

import llguidance
import torch

from sagellm.structured.compiler import CompiledGrammar


class GrammarConstraint:
    """Allowed next tokens of one request under a compiled grammar.

    The matcher allows the model's EOS ids exactly when the grammar may end, and only them once
    it has ended (or broken); :meth:`is_terminated` turns true after an EOS is accepted, when
    the grammar admits nothing more, or after a refused token.
    """

    #: Every path of :meth:`fill_bitmask` writes all the words of its row (llguidance's mask,
    #: the EOS-only row, the cleared tail of a width mismatch): reused rows need no clearing.
    fills_whole_bitmask_row = True

    def __init__(self, grammar: CompiledGrammar) -> None:
        self._matcher = grammar.new_matcher()
        self._tokenizer = grammar.tokenizer
        self._refused: str | None = None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = self._tokenizer.num_words
        self._check_bitmask(bitmask, row)
        width = bitmask.shape[1]
        target = bitmask[row]
        if self._refused is not None:
            self._eos_only(target)
            return
        if width == words:
            self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), words * 4)
            return
        # Widths differ when the tokenizer outgrows the model's logits (ids with no logit row)
        # or the caller's rows are wider: compute in full, keep what fits, clear the rest.
        full = torch.empty(words, dtype=torch.int32)
        self._matcher.unsafe_compute_mask_ptr(full.data_ptr(), words * 4)
        n = min(width, words)
        target[:n].copy_(full[:n])
        target[n:] = 0
        _clear_from(target, self._tokenizer.vocab_size)

    @classmethod
    def fill_bitmask_batch(cls, constraints: list[GrammarConstraint], bitmask: torch.Tensor,
                           rows: list[int]) -> None:
        """:meth:`fill_bitmask` of ``constraints[i]`` into row ``rows[i]``, the common rows (a
        live grammar, rows as wide as its tokenizer's mask) in one llguidance call that computes
        them on its own threads with the interpreter lock released."""
        if not constraints:
            return
        if len(constraints) != len(rows):
            raise ValueError(f"{len(constraints)} constraints for {len(rows)} bitmask rows")
        if len(set(rows)) != len(rows) or not all(0 <= r < bitmask.shape[0] for r in rows):
            raise ValueError(f"bitmask rows must be distinct and in 0..{bitmask.shape[0] - 1}, "
                             f"got {rows}")
        for c, row in zip(constraints, rows, strict=True):
            c._check_bitmask(bitmask, row)
        width = bitmask.shape[1]
        together = [(c._matcher, row) for c, row in zip(constraints, rows, strict=True)
                    if c._refused is None and c._tokenizer.num_words == width]
        if len(together) > 1 and bitmask.is_contiguous():
            _executor().unsafe_compute_mask_ptr(together, bitmask.data_ptr(), width * 4,
                                                bitmask.shape[0])
            done = {row for _, row in together}
        else:
            done = set()
        for c, row in zip(constraints, rows, strict=True):
            if row not in done:
                c.fill_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        if self._refused is not None:
            return False
        if not 0 <= token_id < self._tokenizer.vocab_size:
            self._refused = f"token {token_id} is outside the vocabulary"
            return False
        if not self._matcher.consume_token(token_id):
            self._refused = self._matcher.get_error() or f"token {token_id} is not allowed"
            return False
        return True

    def is_terminated(self) -> bool:
        return self._refused is not None or self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the constraint broke (a refused token), or ``None``."""
        if self._refused is not None:
            return self._refused
        return self._matcher.get_error() or None

    def _check_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
            raise ValueError(f"the bitmask must be a 2-D int32 CPU tensor, got {bitmask.dtype} "
                             f"{tuple(bitmask.shape)} on {bitmask.device}")
        need = (self._tokenizer.vocab_size + 31) // 32
        if bitmask.shape[1] < need or not bitmask[row].is_contiguous():
            raise ValueError(f"bitmask rows must be contiguous with at least {need} words, got "
                             f"{bitmask.shape[1]}")

    def _eos_only(self, target: torch.Tensor) -> None:
        target.zero_()
        for t in self._tokenizer.eos_token_ids:
            w, b = divmod(t, 32)
            target[w] |= _bit(b)


#: Threads of the parallel mask fill: ``SAGELLM_GRAMMAR_THREADS`` if set, else llguidance's
#: default (80% of the machine's cores, up to 32). One executor per process, made on first use.
THREADS_ENV = "SAGELLM_GRAMMAR_THREADS"
_EXECUTOR: llguidance.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def grammar_threads() -> int | None:
    """The mask fill's thread count from :data:`THREADS_ENV` (``None``: llguidance's default);
    ``ValueError`` naming the variable for anything but a positive integer."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return n


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor(grammar_threads())
        return _EXECUTOR


def _bit(b: int) -> int:
    # int32 words: bit 31 is the sign bit.
    return (1 << b) - (1 << 32) if b == 31 else 1 << b


def _clear_from(row: torch.Tensor, first: int) -> None:
    """Clear every bit for tokens ``>= first`` in one bitmask row."""
    w, b = divmod(first, 32)
    if w < row.numel():
        if b:
            keep = (1 << b) - 1
            row[w] &= keep
            w += 1
        row[w:] = 0
