"""The per-request logits work of a step, from the sequences to batched device calls.

The model runner calls these around the sampler: each gathers the rows that ask for one feature
(a constraint, penalties, logit bias, logprobs, prompt logprobs) and makes a few tensor calls
for all of them together, so a step whose requests ask for none of it does no extra work and no
function here loops over the vocabulary.
"""

from __future__ import annotations

import torch

from sagellm.engine.constraint import apply_token_bitmask, new_bitmask
from sagellm.engine.plan import PrefillOp, StepPlan
from sagellm.engine.sequence import SequenceState
from sagellm.engine.token_count_cache import TokenCountCache
from sagellm.layers.logits_processors import apply_logit_bias, apply_penalties
from sagellm.layers.logprobs import gather_logprobs

RawLogprobs = tuple[list[int], torch.Tensor]


def apply_constraints(logits: torch.Tensor, seqs: list[SequenceState]) -> None:
    """Mask, in place, the tokens each constrained row's constraint disallows."""
    rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
    if not rows:
        return
    bitmask = new_bitmask(len(rows), logits.shape[-1])
    for j, i in enumerate(rows):
        seqs[i].constraint.fill_bitmask(bitmask, j)  # type: ignore[union-attr]
    apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.int64))


def apply_penalties_and_bias(logits: torch.Tensor, seqs: list[SequenceState],
                             counts_cache: TokenCountCache) -> None:
    """Presence, frequency and repetition penalties, then logit bias, in place."""
    vocab, dev = logits.shape[-1], logits.device
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if rows:
        ps = [seqs[i].params for i in rows]
        counts, seen = counts_cache.counts([seqs[i] for i in rows], vocab, dev)
        repetition = None
        if any(p.repetition_penalty != 1.0 for p in ps):
            repetition = torch.tensor([p.repetition_penalty for p in ps], device=dev)
        apply_penalties(logits, torch.tensor(rows, device=dev), counts, seen,
                        torch.tensor([p.presence_penalty for p in ps], device=dev),
                        torch.tensor([p.frequency_penalty for p in ps], device=dev), repetition)
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


def raw_logprobs(logits: torch.Tensor, seqs: list[SequenceState]) -> RawLogprobs | None:
    """The model's log-distribution of the rows that ask for logprobs, before any change."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    return rows, logits[rows].log_softmax(-1)


def record_sampled_logprobs(raw: RawLogprobs, ids: torch.Tensor, seqs: list[SequenceState]) -> None:
    """Set ``seq.sampled_logprob`` of the rows in ``raw`` for their sampled token ``ids[row]``."""
    rows, logprobs = raw
    num_top = [seqs[i].params.logprobs or 0 for i in rows]
    picked = ids[torch.tensor(rows, device=ids.device)]
    for i, lp in zip(rows, gather_logprobs(logprobs, picked, max(num_top)).to_list(num_top),
                     strict=True):
        seqs[i].sampled_logprob = lp


def prompt_logit_span(op: PrefillOp) -> tuple[int, int]:
    """``(first, count)``: positions ``first .. first + count - 1`` of ``op`` whose logits give
    the logprob of the next prompt token (the last prompt position predicts the first output
    token, which is sampled, so it is not among them)."""
    last = op.seq.num_prompt_tokens - 1
    return op.start, max(0, min(op.end, last) - op.start)


def record_prompt_logprobs(logits: torch.Tensor, plan: StepPlan) -> None:
    """Fill ``seq.prompt_logprobs`` from the prompt-logprob rows of ``plan`` (``logits``: one
    row per position of every ``prompt_logit_span``, in ``plan.prefills`` order). Slots are
    assigned by position, so a step the engine reruns writes the same values again."""
    spans = [(op.seq, *prompt_logit_span(op)) for op in plan.prefills if op.seq.needs_prompt_logits]
    targets = [t for seq, first, count in spans for t in seq.token_ids[first + 1: first + 1 + count]]
    num_top = [seq.params.prompt_logprobs or 0 for seq, _, count in spans for _ in range(count)]
    assert len(targets) == logits.shape[0]
    if not targets:
        return
    ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    entries = gather_logprobs(logits.log_softmax(-1), ids, max(num_top)).to_list(num_top)
    k = 0
    for seq, first, count in spans:
        assert seq.prompt_logprobs is not None
        seq.prompt_logprobs[first + 1: first + 1 + count] = entries[k: k + count]
        k += count
