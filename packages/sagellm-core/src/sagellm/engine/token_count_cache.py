"""Per-row token counts for penalties, carried from one step's batch to the next on the device.

Penalties need, for each penalised row, how often each token occurs in the output and whether
it occurs at all (prompt or output). Rebuilding that from the token ids every step costs host
time linear in the context (about 15 ms per step for 8 rows of 4k tokens on a CPU, see
``benchmarks/penalty_counts.py``); this cache keeps the last step's ``[rows, vocab]`` tensors and
builds the next step's from them with one row gather plus a scatter of the tokens appended since
(usually one per row). A row it has not seen in the previous step (new, preempted and resumed,
or after a rerun) is built from its token ids once.

It is a cache of a pure function of each sequence's token ids, checked on use (same sequence
object, no fewer tokens than were counted), so a rerun step or an unusual call order gives the
same counts as a rebuild. Its index lists reach the device without a wait
(``sagellm.layers.step_tensors``).
"""

from __future__ import annotations

import torch

from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch
from sagellm.layers.step_tensors import step_tensor


class TokenCountCache:
    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        #: The rows of the cached tensors: the sequences, and how many tokens of each are counted.
        self._batch: list[SequenceState] = []
        self._counted: list[int] = []
        #: Ones for ``scatter_add_``, grown as needed (a slice of it costs no launch).
        self._ones: torch.Tensor | None = None

    def counts(self, seqs: list[SequenceState], vocab_size: int, device: torch.device,
               prev: StepLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output_counts float32 [R, V], seen bool [R, V])`` for ``seqs`` (one row each).

        A row whose last token is still ``PENDING_TOKEN`` (asynchronous scheduling) counts it
        from ``prev``'s ids on the device, the step that sampled it."""
        usable = self._counts is not None and self._counts.shape[1] == vocab_size \
            and self._counts.device == device
        # The common step: the same sequences in the same order (list equality is identity
        # here), none shorter than counted: the tensors are updated in place.
        if usable and seqs == self._batch and all(
                c <= s.num_tokens for s, c in zip(seqs, self._counted)):
            starts = self._counted
            counts, seen = self._counts, self._seen
            assert counts is not None and seen is not None
        else:
            counts, seen, starts = self._regather(seqs, vocab_size, device, usable)
            self._batch = list(seqs)
        prompt_new: list[int] = []  # new prompt tokens: seen only
        out_new: list[int] = []  # new output tokens: seen and counted
        pending: list[int] = []  # rows whose last token is on the device only
        for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            ids, base, first_out = s.token_ids, i * vocab_size, s.num_prompt_tokens
            end = len(ids)
            if ids[-1] == PENDING_TOKEN and start < end:
                pending.append(i)
                end -= 1
                if start == end:
                    continue
            if start >= first_out and end == start + 1:
                out_new.append(base + ids[end - 1])  # one new output token: the decode step
                continue
            prompt_new.extend(base + t for t in ids[start:first_out])
            out_new.extend(base + t for t in ids[max(start, first_out):end])
        if out_new or prompt_new:  # one copy for both: seen takes all, counts the output part
            index = step_tensor(prompt_new + out_new, torch.int64, device)
            num_out = len(out_new)
            if num_out:
                counts.view(-1).scatter_add_(0, index[len(prompt_new):],
                                             self._ones_like(num_out, device))
            # index_fill_ takes the value as a kernel argument; ``seen[idx] = True`` copies a host
            # scalar to the device from pageable memory, which waits for the stream.
            seen.view(-1).index_fill_(0, index, True)
        if pending:
            self._count_pending(counts, seen, [seqs[i] for i in pending], pending, vocab_size,
                                prev)
        self._counts, self._seen = counts, seen
        self._counted = [s.num_tokens for s in seqs]
        return counts, seen

    def _count_pending(self, counts: torch.Tensor, seen: torch.Tensor,
                       seqs: list[SequenceState], rows: list[int], vocab_size: int,
                       prev: StepLaunch | None) -> None:
        """Count, on the device, the pending (output) token of each of ``rows`` from ``prev``."""
        if prev is None or prev.ids is None:
            raise RuntimeError("a penalised row's last token is pending, but no queued step "
                               "sampled it")
        where = prev.row_of()
        n = len(rows)
        index = step_tensor([r * vocab_size for r in rows] + [where[s.request_id] for s in seqs],
                            torch.int64, counts.device)
        flat = index[:n] + prev.ids.index_select(0, index[n:]).to(torch.int64)
        counts.view(-1).scatter_add_(0, flat, self._ones_like(n, counts.device))
        seen.view(-1).index_fill_(0, flat, True)

    def _regather(self, seqs: list[SequenceState], vocab_size: int, device: torch.device,
                  usable: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The rows of ``seqs`` from the cached tensors where they are there (and still valid),
        zero rows otherwise; with the tokens each row has counted."""
        n = len(seqs)
        where = {id(s): i for i, s in enumerate(self._batch)} if usable else {}
        keep_dst: list[int] = []
        keep_src: list[int] = []
        starts: list[int] = []
        for i, s in enumerate(seqs):
            j = where.get(id(s))
            if j is not None and self._batch[j] is s and self._counted[j] <= s.num_tokens:
                keep_dst.append(i)
                keep_src.append(j)
                starts.append(self._counted[j])
            else:
                starts.append(0)
        old_counts, old_seen = self._counts, self._seen
        if len(keep_dst) == n and old_counts is not None and old_seen is not None:
            src = step_tensor(keep_src, torch.int64, device)
            return old_counts.index_select(0, src), old_seen.index_select(0, src), starts
        counts = torch.zeros((n, vocab_size), dtype=torch.float32, device=device)
        seen = torch.zeros((n, vocab_size), dtype=torch.bool, device=device)
        if keep_dst:
            assert old_counts is not None and old_seen is not None
            dst = step_tensor(keep_dst, torch.int64, device)
            src = step_tensor(keep_src, torch.int64, device)
            counts.index_copy_(0, dst, old_counts.index_select(0, src))
            seen.index_copy_(0, dst, old_seen.index_select(0, src))
        return counts, seen, starts

    def _ones_like(self, n: int, device: torch.device) -> torch.Tensor:
        if self._ones is None or self._ones.numel() < n or self._ones.device != device:
            self._ones = torch.ones(max(n, 64), device=device)
        return self._ones[:n]
