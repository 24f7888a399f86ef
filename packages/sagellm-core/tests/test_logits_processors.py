"""Penalties, logit bias, min-p, the token bitmask and logprob gathering against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from sagellm.engine.constraint import apply_token_bitmask, bitmask_words, new_bitmask
from sagellm.layers.logits_processors import apply_logit_bias, apply_penalties, token_counts
from sagellm.layers.logprobs import gather_logprobs, torch_logprobs
from sagellm.layers.sampler import Sampler, SamplingBatch, apply_min_p

V = 11


def reference_penalties(logits: list[float], prompt: list[int], output: list[int], presence: float,
                        frequency: float, repetition: float) -> list[float]:
    """One row, the textbook way: a loop over tokens."""
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


ROWS = [  # prompt, output, presence, frequency, repetition
    ([1, 2, 2], [3, 3, 3, 4], 0.5, 0.0, 1.0),
    ([0, 5], [5, 6, 6], 0.0, 0.7, 1.0),
    ([7, 8, 9], [9, 10], 0.0, 0.0, 1.6),
    ([4], [4, 4, 1, 2], -0.3, 1.2, 0.5),
]


def test_penalties_match_a_plain_loop_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS) + 1, V, generator=g) * 3  # the last row has no penalty
    expected = [reference_penalties(logits[i].tolist(), *r) for i, r in enumerate(ROWS)]
    untouched = logits[-1].clone()
    rows = torch.arange(len(ROWS))
    counts = token_counts([r[1] for r in ROWS], V, logits.device)
    seen = token_counts([r[0] + r[1] for r in ROWS], V, logits.device) > 0
    apply_penalties(logits, rows, counts, seen, torch.tensor([r[2] for r in ROWS]),
                    torch.tensor([r[3] for r in ROWS]), torch.tensor([r[4] for r in ROWS]))
    torch.testing.assert_close(logits[:-1], torch.tensor(expected))
    assert torch.equal(logits[-1], untouched)


def test_token_counts_counts_repeats_and_handles_empty_rows() -> None:
    counts = token_counts([[3, 3, 1], [], [0]], 5, torch.device("cpu"))
    assert counts.tolist() == [[0, 1, 0, 2, 0], [0] * 5, [1, 0, 0, 0, 0]]
    assert token_counts([[], []], 4, torch.device("cpu")).sum() == 0


def test_logit_bias_adds_to_exactly_the_named_tokens() -> None:
    logits = torch.zeros(2, V)
    apply_logit_bias(logits, [0, 0, 1], [3, 7, 3], [5.0, -100.0, 2.5])
    expected = torch.zeros(2, V)
    expected[0, 3], expected[0, 7], expected[1, 3] = 5.0, -100.0, 2.5
    assert torch.equal(logits, expected)
    apply_logit_bias(logits, [], [], [])  # nothing to do
    assert torch.equal(logits, expected)


def test_min_p_drops_tokens_below_the_fraction_of_the_top() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    kept = apply_min_p(probs, torch.tensor([0.5, 0.9]))
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    assert torch.equal(apply_min_p(probs, torch.zeros(2)), probs)


def test_min_p_in_the_sampler_never_picks_a_dropped_token() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.06, 0.04]])).repeat(400, 1)
    batch = SamplingBatch([1.0] * 400, [-1] * 400, [1.0] * 400, [None] * 400, min_ps=[0.2] * 400)
    picked = set(Sampler()(logits, batch).tolist())
    assert picked == {0, 1}


def reference_bitmask_allowed(words: list[int], vocab: int) -> list[bool]:
    return [bool((words[t // 32] >> (t % 32)) & 1) for t in range(vocab)]


def test_bitmask_unpacks_every_bit_including_the_sign_bit() -> None:
    vocab = 70  # three words, the last one partial
    assert bitmask_words(vocab) == 3
    bitmask = new_bitmask(2, vocab)
    allowed = [0, 5, 31, 32, 63, 64, 69]
    for t in allowed:
        bitmask[0, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # everything
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_token_bitmask(logits, bitmask, torch.tensor([2, 0]))  # mask row 0 -> logits row 2
    ref = reference_bitmask_allowed([w & 0xFFFFFFFF for w in bitmask[0].tolist()], vocab)
    assert [t for t in range(vocab) if ref[t]] == allowed
    assert [t for t in range(vocab) if logits[2, t] > -math.inf] == allowed
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[1], before[1])


def test_bitmask_narrower_than_padded_logits_disallows_the_padding() -> None:
    bitmask = torch.full((1, 1), -1, dtype=torch.int32)  # 32 tokens, all allowed
    logits = torch.zeros(1, 40)
    apply_token_bitmask(logits, bitmask, torch.tensor([0]))
    assert (logits[0, :32] == 0).all() and (logits[0, 32:] == -math.inf).all()


def test_gather_logprobs_rank_and_top() -> None:
    lp = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1]]).log()
    out = gather_logprobs(lp, torch.tensor([2, 0]), 2).to_list([2, 0])
    assert out[0].token_id == 2 and out[0].rank == 2  # only token 1 is strictly more likely
    assert out[0].logprob == pytest.approx(math.log(0.2))
    assert [t for t, _ in out[0].top] == [1, out[0].top[1][0]] and out[0].top[1][0] in (2, 3)
    assert out[1].rank == 1 and out[1].top == ()


def test_packed_logprobs_come_back_exactly_as_the_tensors_hold_them() -> None:
    """One int64 copy (float32 values by their bits) gives the same numbers as reading each
    tensor on its own, per row's own number of alternatives."""
    from sagellm.layers.logprobs import unpack_logprobs

    g = torch.Generator().manual_seed(3)
    lps = (torch.randn(3, V, generator=g) * 4).log_softmax(-1)
    ids = torch.tensor([4, 0, 10])
    t = gather_logprobs(lps, ids, 4)
    got = unpack_logprobs(t.pack().tolist(), 4, [4, 0, 2])
    for r, (lp, n) in enumerate(zip(got, [4, 0, 2], strict=True)):
        assert lp.token_id == ids[r].item() and lp.rank == t.ranks[r].item()
        assert lp.logprob == t.logprobs[r].item()  # bit-exact
        assert list(lp.top) == list(zip(t.top_ids[r, :n].tolist(), t.top_logprobs[r, :n].tolist()))
    assert t.to_list([4, 0, 2]) == got
    assert unpack_logprobs([], 4, []) == []
    with pytest.raises(ValueError, match="do not hold 2 rows"):
        unpack_logprobs(t.pack().tolist()[:-1], 4, [4, 0])


def test_fetch_sampled_brings_ids_and_logprobs_in_one_copy() -> None:
    """``ModelRunner.fetch_sampled``: one copy (``start_fetch``), the same ids and logprobs as
    the waiting ``record_sampled_logprobs`` path."""
    from types import SimpleNamespace

    from sagellm.engine import request_logits
    from sagellm.engine.model_runner import ModelRunner

    class Platform:
        calls = 0

        def start_fetch(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
            Platform.calls += 1
            return ids.tolist

    def seq(k: int | None) -> SimpleNamespace:
        return SimpleNamespace(params=SimpleNamespace(logprobs=k), sampled_logprob=None)

    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([2, 9, 4])
    seqs, ref = [seq(2), seq(None), seq(0)], [seq(2), seq(None), seq(0)]
    raw = request_logits.raw_logprobs(logits, seqs)  # type: ignore[arg-type]
    assert raw is not None and raw[0] == [0, 2]
    runner = object.__new__(ModelRunner)
    runner.platform = Platform()  # type: ignore[assignment]
    pending = request_logits.sampled_logprobs(raw, ids, seqs, torch_logprobs)  # type: ignore[arg-type]
    assert runner.fetch_sampled(ids, pending, seqs) == [2, 9, 4]  # type: ignore[arg-type]
    assert Platform.calls == 1
    request_logits.record_sampled_logprobs(raw, ids, ref, torch_logprobs)  # type: ignore[arg-type]
    assert [s.sampled_logprob for s in seqs] == [s.sampled_logprob for s in ref]
    assert seqs[0].sampled_logprob.token_id == 2 and len(seqs[0].sampled_logprob.top) == 2
    assert seqs[1].sampled_logprob is None and seqs[2].sampled_logprob.top == ()
    assert runner.fetch_sampled(ids, None, seqs) == [2, 9, 4]  # type: ignore[arg-type]


def test_raw_logprobs_keep_the_logits_from_before_in_place_changes() -> None:
    """The logits are masked and penalised in place after ``raw_logprobs``; the logprobs taken
    after sampling still come from the model's own logits, when every row asks for them (a
    copy) as when some do (the selected rows)."""
    from types import SimpleNamespace

    from sagellm.backends.cpu import CpuPlatform
    from sagellm.engine import request_logits

    def seq(k: int | None) -> SimpleNamespace:
        return SimpleNamespace(params=SimpleNamespace(logprobs=k), sampled_logprob=None)

    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(8))
    want = torch_logprobs(logits.clone(), torch.tensor([1, 2]), 3)
    op = CpuPlatform().logprobs  # the contract's default: torch_logprobs
    for seqs, rows in (([seq(3), seq(3)], [0, 1]), ([seq(None), seq(3)], [1])):
        work = logits.clone()
        raw = request_logits.raw_logprobs(work, seqs)  # type: ignore[arg-type]
        work.fill_(float("-inf"))  # what a mask could do in place
        got = request_logits.sampled_logprobs(raw, torch.tensor([1, 2]), seqs, op)  # type: ignore[arg-type]
        assert got.rows == rows
        assert torch.equal(got.tensors.logprobs, want.logprobs[rows])
        assert torch.equal(got.tensors.top_ids, want.top_ids[rows])
