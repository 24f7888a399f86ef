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
from sagellm.layers.step_tensors import step_tensor


class TokenCountCache:
    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        #: id(seq) -> (seq, its row in the cached tensors, tokens counted).
        self._rows: dict[int, tuple[SequenceState, int, int]] = {}

    def counts(self, seqs: list[SequenceState], vocab_size: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output_counts float32 [R, V], seen bool [R, V])`` for ``seqs`` (one row each)."""
        n = len(seqs)
        usable = self._counts is not None and self._counts.shape[1] == vocab_size \
            and self._counts.device == device
        keep_dst: list[int] = []
        keep_src: list[int] = []
        starts: list[int] = []
        for i, s in enumerate(seqs):
            entry = self._rows.get(id(s)) if usable else None
            if entry is not None and entry[0] is s and entry[2] <= s.num_tokens:
                keep_dst.append(i)
                keep_src.append(entry[1])
                starts.append(entry[2])
            else:
                starts.append(0)
        old_counts, old_seen = self._counts, self._seen
        if len(keep_dst) == n and keep_src == list(range(n)) and old_counts is not None \
                and old_counts.shape[0] == n and old_seen is not None:
            counts, seen = old_counts, old_seen  # the same batch as last step: update in place
        elif len(keep_dst) == n and old_counts is not None and old_seen is not None:
            src = step_tensor(keep_src, torch.int64, device)
            counts, seen = old_counts.index_select(0, src), old_seen.index_select(0, src)
        else:
            counts = torch.zeros((n, vocab_size), dtype=torch.float32, device=device)
            seen = torch.zeros((n, vocab_size), dtype=torch.bool, device=device)
            if keep_dst:
                assert old_counts is not None and old_seen is not None
                dst = step_tensor(keep_dst, torch.int64, device)
                src = step_tensor(keep_src, torch.int64, device)
                counts.index_copy_(0, dst, old_counts.index_select(0, src))
                seen.index_copy_(0, dst, old_seen.index_select(0, src))
        out_flat: list[int] = []
        seen_flat: list[int] = []
        for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            base = i * vocab_size
            seen_flat.extend(base + t for t in s.token_ids[start:])
            out_flat.extend(base + t for t in s.token_ids[max(start, s.num_prompt_tokens):])
        if out_flat or seen_flat:  # one copy for both index lists
            index = step_tensor(out_flat + seen_flat, torch.int64, device)
            num_out = len(out_flat)
            if num_out:
                counts.view(-1).scatter_add_(0, index[:num_out],
                                             torch.ones(num_out, device=device))
            if seen_flat:
                # index_fill_ takes the value as a kernel argument; ``seen[idx] = True`` copies
                # a host scalar to the device from pageable memory, which waits for the stream.
                seen.view(-1).index_fill_(0, index[num_out:], True)
        self._counts, self._seen = counts, seen
        self._rows = {id(s): (s, i, s.num_tokens) for i, s in enumerate(seqs)}
        return counts, seen
