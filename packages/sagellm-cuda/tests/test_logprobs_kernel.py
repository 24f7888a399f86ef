"""The logprobs kernel (``CudaPlatform.logprobs``) against core's torch op on random logits.

Without a GPU the kernel runs in Triton's interpreter (``conftest.py``) on small vocabularies
split into small chunks, so several chunks and the merge are exercised; ``-m gpu`` adds the
real size (Qwen2.5's vocabulary, 16 rows), inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sagellm.layers.logprobs import LogprobTensors, torch_logprobs
from sagellm.sampling_params import MAX_LOGPROBS, SamplingParams
from sagellm_cuda.logprobs_kernel import MAX_TOP, top_bucket, topk_logprobs

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """Random logits with masked (-inf) tokens and ties, as ``rows`` rows of a buffer ``pad``
    wider than the vocabulary (so the row stride is not ``vocab``)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(rows, vocab + pad, generator=g) * 4
    buf[:, : vocab // 3 : 2] = float("-inf")  # a constraint's mask
    if rows > 1:  # a row of a few distinct values: ties everywhere, also across chunks
        buf[1] = torch.randint(0, 3, (vocab + pad,), generator=g).float()
    return buf.to(DEV, dtype)[:, :vocab]


def _check(got: LogprobTensors, logits: torch.Tensor, ids: torch.Tensor, k: int) -> None:
    """Values as core's torch op gives them; ranks and the order of the alternatives from the
    raw logits, exactly. (The torch op compares rounded logprobs: two logits a float32 ulp of
    the logprob apart tie there, so its rank may be lower and its tie order is ``topk``'s,
    which is unspecified; the kernel's ties are equal logits, lowest id first.)"""
    want = torch_logprobs(logits, ids, k)
    x = logits.float()
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)
    assert torch.equal(got.token_ids, want.token_ids)
    chosen = x.gather(1, ids[:, None])
    assert torch.equal(got.ranks, (x > chosen).sum(-1) + 1)
    assert bool((want.ranks <= got.ranks).all())
    assert got.top_ids.shape == want.top_ids.shape == (logits.shape[0], min(k, logits.shape[1]))
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=0, atol=2e-5)
    order = x.sort(dim=-1, descending=True, stable=True).indices
    assert torch.equal(got.top_ids, order[:, : got.num_top])
    assert got.logprobs.dtype == got.top_logprobs.dtype == torch.float32
    assert got.ranks.dtype == got.top_ids.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "vocab", "block", "k"),
                         [(1, 300, 64, 5), (16, 130, 64, 20), (16, 129, 128, 1), (3, 97, 32, 0)])
def test_kernel_matches_torch(rows: int, vocab: int, block: int, k: int,
                              dtype: torch.dtype) -> None:
    logits = _logits(rows, vocab, dtype, seed=rows + vocab, pad=7)
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(0, vocab, (rows,), generator=g).to(DEV)
    ids[0] = 0  # a masked token: logprob -inf, ranked after every finite one
    _check(topk_logprobs(logits, ids, k, block=block), logits, ids, k)


def test_alternatives_tied_at_the_cut_are_the_lowest_ids() -> None:
    """Eight equal best logits in two chunks, three asked for: ids 3, 5, 40 (torch may pick any)."""
    logits = torch.zeros(1, 100, device=DEV)
    logits[0, [40, 3, 77, 5, 60, 90, 41, 99]] = 2.0
    got = topk_logprobs(logits, torch.tensor([77], device=DEV), 3, block=32)
    assert got.top_ids.tolist() == [[3, 5, 40]]
    assert got.ranks.tolist() == [1]  # nothing strictly above a tied best


def test_vocabulary_smaller_than_k_keeps_every_token() -> None:
    logits = torch.tensor([[0.5, float("-inf"), 2.0]], device=DEV)
    got = topk_logprobs(logits, torch.tensor([1], device=DEV), 20)
    _check(got, logits, torch.tensor([1], device=DEV), 20)
    assert got.top_ids.tolist() == [[2, 0, 1]]


def test_logits_strided_along_the_vocabulary_are_read_right() -> None:
    logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(2)).to(DEV).t()
    assert logits.stride() == (1, 3)
    ids = torch.tensor([0, 5, 39], device=DEV)
    _check(topk_logprobs(logits, ids, 4, block=16), logits, ids, 4)


def test_empty_batch_gives_empty_tensors() -> None:
    got = topk_logprobs(torch.empty(0, 50, device=DEV), torch.empty(0, dtype=torch.int64,
                                                                    device=DEV), 5)
    assert got.top_ids.shape == got.top_logprobs.shape == (0, 5)
    assert got.logprobs.shape == got.ranks.shape == (0,)
    assert got.to_list([]) == []


def test_bad_arguments_are_refused_by_name() -> None:
    logits = torch.zeros(2, 10, device=DEV)
    ids = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="k .* must be in 0..32, got 33"):
        topk_logprobs(logits, ids, MAX_TOP + 1)
    with pytest.raises(ValueError, match="got -1"):
        topk_logprobs(logits, ids, -1)
    with pytest.raises(ValueError, match="token_ids must hold one id per row"):
        topk_logprobs(logits, ids[:1], 2)
    with pytest.raises(ValueError, match=r"logits must be \[rows, vocab\]"):
        topk_logprobs(logits[0], ids, 2)
    with pytest.raises(ValueError, match="empty vocabulary"):
        topk_logprobs(logits[:, :0], ids, 2)


def test_every_request_the_engine_accepts_fits_a_bucket() -> None:
    """Requests are validated where they arrive: more than MAX_LOGPROBS is refused, naming the
    field, and every accepted ``k`` has a compiled bucket."""
    assert top_bucket(MAX_LOGPROBS) <= MAX_TOP
    assert [top_bucket(k) for k in (0, 1, 2, 3, 5, 8, 9, 20)] == [1, 1, 2, 4, 8, 8, 16, 32]
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValidationError, match=field):
            SamplingParams(**{field: MAX_LOGPROBS + 1})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 20])
def test_qwen_vocabulary_in_a_cuda_graph(dtype: torch.dtype, k: int) -> None:
    """16 rows of 151,936 logits: the kernel replayed in a CUDA graph gives the torch values;
    the timings of both (graph replay vs eager torch op) are printed for the record."""
    rows, vocab = 16, 151_936
    logits = _logits(rows, vocab, dtype, seed=k)
    ids = torch.randint(0, vocab, (rows,), device=DEV)
    _check(topk_logprobs(logits, ids, k), logits, ids, k)
    topk_logprobs(logits, ids, k)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_logprobs(logits, ids, k)
    logits.copy_(_logits(rows, vocab, dtype, seed=k + 1))
    graph.replay()
    _check(out, logits, ids, k)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / 50

    fused = timed(graph.replay)
    torch_us = timed(lambda: torch_logprobs(logits, ids, k).pack())
    print(f"\nlogprobs k={k} {dtype}: kernel {fused:.1f} us/step (graph), torch {torch_us:.1f} us")
