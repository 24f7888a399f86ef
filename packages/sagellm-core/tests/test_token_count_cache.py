"""The carried token counts equal a from-scratch rebuild, whatever the batch does between steps."""

from __future__ import annotations

import random

import torch

from sagellm.engine.sequence import SequenceState
from sagellm.engine.token_count_cache import TokenCountCache
from sagellm.layers.logits_processors import token_counts
from sagellm.sampling_params import SamplingParams

V = 37


def rebuilt(seqs: list[SequenceState]) -> tuple[torch.Tensor, torch.Tensor]:
    cpu = torch.device("cpu")
    counts = token_counts([s.token_ids[s.num_prompt_tokens:] for s in seqs], V, cpu)
    return counts, token_counts([s.token_ids for s in seqs], V, cpu) > 0


def test_cached_counts_follow_joins_leaves_reorders_and_reruns() -> None:
    rnd = random.Random(0)
    pool = [SequenceState(f"s{i}", [rnd.randrange(V) for _ in range(rnd.randint(1, 9))],
                          SamplingParams(presence_penalty=1.0)) for i in range(6)]
    cache = TokenCountCache()
    batches = [[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 0], [2, 0, 3], [3], [4, 5, 1], [4, 5, 1]]
    for step, rows in enumerate(batches):
        seqs = [pool[i] for i in rows]
        for _ in range(1 + (step == 3)):  # step 3 runs twice, as a rerun after a failure would
            counts, seen = cache.counts(seqs, V, torch.device("cpu"))
            want_counts, want_seen = rebuilt(seqs)
            assert torch.equal(counts, want_counts) and torch.equal(seen, want_seen), step
        for s in seqs:  # the step's sampled tokens, sometimes a repeat
            s.token_ids.append(s.token_ids[-1] if rnd.random() < 0.3 else rnd.randrange(V))
    fresh = SequenceState("s0", list(pool[0].token_ids), pool[0].params)  # same id, new object
    counts, _ = cache.counts([fresh], V, torch.device("cpu"))
    assert torch.equal(counts, rebuilt([fresh])[0])
    counts, _ = cache.counts([fresh], V + 1, torch.device("cpu"))  # another vocabulary: rebuilt
    assert counts.shape == (1, V + 1)


def test_same_batch_is_updated_in_place_whatever_each_row_gained() -> None:
    """Rows of a steady batch gain zero, one or several tokens between calls (a row whose
    prompt is still prefilling gains prompt tokens, which are seen but not counted)."""
    rnd = random.Random(1)
    seqs = [SequenceState(f"s{i}", [rnd.randrange(V) for _ in range(3)],
                          SamplingParams(frequency_penalty=1.0)) for i in range(70)]
    cache = TokenCountCache()
    cpu = torch.device("cpu")
    first, _ = cache.counts(seqs, V, cpu)
    for gained in (1, 0, 3, 1):
        for s in seqs:
            s.token_ids.extend(rnd.randrange(V) for _ in range(gained))
        counts, seen = cache.counts(list(seqs), V, cpu)
        assert counts.data_ptr() == first.data_ptr()  # the same tensors, no regather
        want_counts, want_seen = rebuilt(seqs)
        assert torch.equal(counts, want_counts) and torch.equal(seen, want_seen), gained
    partial = SequenceState("p", [1, 2, 3, 4], SamplingParams(frequency_penalty=1.0))
    partial.token_ids = partial.token_ids[:2]  # counted while only part of the prompt is there
    cache.counts([partial], V, cpu)
    partial.token_ids += [3, 4, 5]  # the rest of the prompt, then one output token
    counts, seen = cache.counts([partial], V, cpu)
    assert counts[0].nonzero().flatten().tolist() == [5]
    assert seen[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_pending_tokens_are_counted_from_the_previous_steps_ids_on_the_device() -> None:
    """Asynchronous scheduling: each step's rows end in ``PENDING_TOKEN``, whose value only the
    previous launch's ids hold; the counts equal a rebuild from the real tokens, through
    joins (a new row whose whole history is counted at once, pending last), reorders and a
    row with nothing new but its pending token."""
    import pytest

    from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch

    rnd = random.Random(1)
    pool = [SequenceState(f"s{i}", [rnd.randrange(V) for _ in range(rnd.randint(1, 9))],
                          SamplingParams(frequency_penalty=1.0)) for i in range(4)]
    cache = TokenCountCache()
    for step, rows in enumerate([[0, 1], [0, 1], [1, 0, 2], [2, 3], [2, 3, 0]]):
        seqs = [pool[i] for i in rows]
        real = [rnd.randrange(V) for _ in seqs]
        prev_order = list(reversed(seqs))  # the previous launch's rows, in another order
        prev = StepLaunch(prev_order, torch.tensor([real[seqs.index(s)] for s in prev_order]),
                          lambda: [])
        for s in seqs:
            s.token_ids.append(PENDING_TOKEN)
        counts, seen = cache.counts(seqs, V, torch.device("cpu"), prev)
        for s, tok in zip(seqs, real):
            s.token_ids[-1] = tok  # the engine writes the token over the placeholder
        want_counts, want_seen = rebuilt(seqs)
        assert torch.equal(counts, want_counts) and torch.equal(seen, want_seen), step
    pool[0].token_ids.append(PENDING_TOKEN)
    with pytest.raises(RuntimeError, match="no queued step sampled it"):
        TokenCountCache().counts([pool[0]], V, torch.device("cpu"))
