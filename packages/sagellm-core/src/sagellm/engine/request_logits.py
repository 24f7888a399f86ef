"""The per-request logits work of a step, from the sequences to batched device calls.

The model runner calls these around the sampler: each gathers the rows that ask for one feature
(a constraint, penalties, logit bias, logprobs, prompt logprobs) and makes a few tensor calls
for all of them together, so a step whose requests ask for none of it does no extra work and no
function here loops over the vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sagellm.engine.constraint import apply_token_bitmask, fill_bitmasks
from sagellm.engine.mask_fill import BitmaskPool, DeviceWait, MaskFill
from sagellm.engine.plan import PrefillOp, StepPlan
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import StepLaunch
from sagellm.engine.token_count_cache import TokenCountCache
from sagellm.layers.logits_processors import apply_logit_bias, apply_penalties
from sagellm.layers.logprobs import LogprobsOp, LogprobTensors, unpack_logprobs
from sagellm.layers.step_tensors import RepeatedStepTensor, row_index, step_tensor

#: The rows of a step that ask for logprobs, and a copy of their logits as the model made them.
RawLogprobs = tuple[list[int], torch.Tensor]


#: ``apply(logits, bitmask, rows)``: sets the disallowed logits to ``-inf`` in place (core's
#: :func:`~sagellm.engine.constraint.apply_token_bitmask`, or a runner's kernel).
ApplyBitmask = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def apply_constraints(logits: torch.Tensor, seqs: list[SequenceState], pool: BitmaskPool, *,
                      fill: MaskFill | None = None,
                      apply: ApplyBitmask = apply_token_bitmask,
                      device_wait: DeviceWait | None = None) -> None:
    """Mask, in place, the tokens each constrained row's constraint disallows.

    ``fill``: the masks begun by the runner for these rows (:mod:`sagellm.engine.mask_fill`,
    checked to be theirs; ``device_wait``, where the device can wait for the fill instead of
    the host: :meth:`MaskFill.take`); without it they are filled here, into a buffer of
    ``pool``. Either way they go over in one non-blocking copy while the device still runs."""
    rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
    if not rows:
        if fill is not None:
            fill.take(seqs, logits.shape[-1])  # raises: the fill was begun for constrained rows
        return
    dev, vocab = logits.device, logits.shape[-1]
    if fill is not None:
        bitmask, done = fill.take(seqs, vocab, device_wait), fill.release
    else:
        slot, bitmask = pool.acquire(len(rows), vocab)
        fill_bitmasks([seqs[i].constraint for i in rows], bitmask)  # type: ignore[misc]
        done = functools.partial(pool.release, slot)
    try:
        apply(logits, bitmask, row_index(rows, len(seqs), dev))
    finally:
        done()


#: ``penalize(logits, rows, counts, seen, presence, frequency, repetition)``: in place, as
#: :func:`sagellm.layers.logits_processors.apply_penalties` (a backend's runner may fuse it).
PenaltyOp = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None",
                      torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def apply_penalties_and_bias(logits: torch.Tensor, seqs: list[SequenceState],
                             counts_cache: TokenCountCache,
                             settings: RepeatedStepTensor | None = None,
                             penalize: PenaltyOp = apply_penalties,
                             prev: StepLaunch | None = None) -> None:
    """Presence, frequency and repetition penalties (by ``penalize``), then logit bias, in
    place. ``prev``: the step queued before, which sampled the rows' pending tokens (if any).

    ``settings``: where the penalised rows' penalty values stay on the device from step to step
    (one copy when they change instead of three every step); without it they are copied."""
    vocab, dev = logits.shape[-1], logits.device
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if rows:
        ps = [seqs[i].params for i in rows]
        counts, seen = counts_cache.counts([seqs[i] for i in rows], vocab, dev, prev)
        values = ([p.presence_penalty for p in ps] + [p.frequency_penalty for p in ps]
                  + [p.repetition_penalty for p in ps])
        table = (settings.get(values, torch.float32, dev) if settings is not None
                 else step_tensor(values, torch.float32, dev)).view(3, len(rows))
        repetition = table[2] if any(p.repetition_penalty != 1.0 for p in ps) else None
        penalize(logits, row_index(rows, len(seqs), dev), counts, seen, table[0], table[1],
                 repetition)
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    biases: list[float] = []
    for i, s in enumerate(seqs):
        for tok, bias in s.params.logit_bias.items():
            if tok < vocab:  # the engine refuses larger ids; a padded vocabulary may differ
                bias_rows.append(i)
                bias_ids.append(tok)
                biases.append(bias)
    apply_logit_bias(logits, bias_rows, bias_ids, biases)


def raw_logprobs(logits: torch.Tensor, seqs: list[SequenceState], copy: bool = True
                 ) -> RawLogprobs | None:
    """The logits of the rows that ask for logprobs, copied before anything changes them in
    place (masks, penalties, bias); their logprobs are taken after sampling
    (:func:`sampled_logprobs`). ``copy=False``: nothing will change ``logits`` (the caller's
    promise), so when every row asks they are kept as they are."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    index = row_index(rows, len(seqs), logits.device)
    if index is None:
        return rows, logits.clone() if copy else logits
    return rows, logits.index_select(0, index)


@dataclass
class SampledLogprobs:
    """The logprobs of one step's sampled tokens, still on the device: rows ``rows`` of the
    step, each keeping ``num_top[i]`` alternatives. :meth:`record` sets them on the sequences
    from the host values of ``tensors.pack()``."""

    rows: list[int]
    num_top: list[int]
    tensors: LogprobTensors

    def record(self, packed: list[int], seqs: list[SequenceState]) -> None:
        entries = unpack_logprobs(packed, self.tensors.num_top, self.num_top)
        for i, lp in zip(self.rows, entries, strict=True):
            seqs[i].sampled_logprob = lp


def sampled_logprobs(raw: RawLogprobs, ids: torch.Tensor, seqs: list[SequenceState],
                     op: LogprobsOp) -> SampledLogprobs:
    """The logprobs of the sampled ``ids`` for the rows in ``raw``, by ``op`` (the platform's
    ``logprobs``; no wait for the device)."""
    rows, logits = raw
    num_top = [seqs[i].params.logprobs or 0 for i in rows]
    index = row_index(rows, ids.shape[0], ids.device)
    picked = ids if index is None else ids.index_select(0, index)
    return SampledLogprobs(rows, num_top, op(logits, picked, max(num_top)))


def record_sampled_logprobs(raw: RawLogprobs, ids: torch.Tensor, seqs: list[SequenceState],
                            op: LogprobsOp) -> None:
    """Set ``seq.sampled_logprob`` of the rows in ``raw`` for their sampled token ``ids[row]``
    (waits for the device; the model runner's own steps fetch them with the ids instead)."""
    pending = sampled_logprobs(raw, ids, seqs, op)
    pending.record(pending.tensors.pack().tolist(), seqs)


def prompt_logit_span(op: PrefillOp) -> tuple[int, int]:
    """``(first, count)``: positions ``first .. first + count - 1`` of ``op`` whose logits give
    the logprob of the next prompt token (the last prompt position predicts the first output
    token, which is sampled, so it is not among them)."""
    last = op.seq.num_prompt_tokens - 1
    return op.start, max(0, min(op.end, last) - op.start)


def record_prompt_logprobs(logits: torch.Tensor, plan: StepPlan, op: LogprobsOp) -> None:
    """Fill ``seq.prompt_logprobs`` from the prompt-logprob rows of ``plan`` (``logits``: one
    row per position of every ``prompt_logit_span``, in ``plan.prefills`` order), by ``op``
    (the platform's ``logprobs``). Slots are assigned by position, so a step the engine reruns
    writes the same values again."""
    spans = [(op.seq, *prompt_logit_span(op)) for op in plan.prefills if op.seq.needs_prompt_logits]
    targets = [t for seq, first, count in spans for t in seq.token_ids[first + 1: first + 1 + count]]
    num_top = [seq.params.prompt_logprobs or 0 for seq, _, count in spans for _ in range(count)]
    assert len(targets) == logits.shape[0]
    if not targets:
        return
    ids = step_tensor(targets, torch.int64, logits.device)
    entries = op(logits, ids, max(num_top)).to_list(num_top)
    k = 0
    for seq, first, count in spans:
        assert seq.prompt_logprobs is not None
        seq.prompt_logprobs[first + 1: first + 1 + count] = entries[k: k + count]
        k += count
