"""The Triton penalties kernel against core's torch ``apply_penalties`` (Triton's interpreter
on a machine without a GPU, see ``conftest.py``; the same tests on the GPU, where they also run
through the CUDA graph runner's ``apply_penalties``)."""

from __future__ import annotations

import pytest
import torch

from sagellm.layers.logits_processors import apply_penalties
from sagellm_cuda.penalties_kernel import BLOCK, apply_penalties_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch: int, rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits with positive, negative, zero and -inf entries; counts 0..3; seen a superset of
    counted; per-row penalties including neutral ones (0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    logits[:, ::7] = 0.0
    logits[:, 1::11] = float("-inf")  # masked by a grammar before the penalties
    counts = torch.randint(0, 4, (rows, vocab), generator=g).float()
    counts[counts < 2] = 0.0
    seen = (counts > 0) | (torch.rand(rows, vocab, generator=g) < 0.1)
    pres = torch.rand(rows, generator=g) * 2 - 1
    freq = torch.rand(rows, generator=g) * 2 - 1
    rep = 0.5 + torch.rand(rows, generator=g) * 1.5
    pres[0], freq[0], rep[0] = 0.0, 0.0, 1.0
    return (logits.to(DEVICE, dtype), counts.to(DEVICE), seen.to(DEVICE),
            [t.to(DEVICE) for t in (pres, freq, rep)])


@pytest.mark.parametrize(("vocab", "with_rep"), [(1000, True), (BLOCK, False),
                                                  (2 * BLOCK + 5, True), (1, True)])
def test_every_row_matches_torch(vocab: int, with_rep: bool) -> None:
    """V below, at and past a block (a partial last one), a one-token vocabulary; with and
    without repetition (then ``seen`` is not read: ``None`` is taken)."""
    logits, counts, seen, (pres, freq, rep) = _case(4, 4, vocab, seed=vocab)
    want = logits.clone()
    apply_penalties(want, None, counts, seen, pres, freq, rep if with_rep else None)
    apply_penalties_triton(logits, None, counts, seen if with_rep else None, pres, freq,
                           rep if with_rep else None)
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
    assert torch.isneginf(logits[:, 1::11]).all()  # -inf stays -inf whatever the penalty


def test_only_the_indexed_rows_change() -> None:
    """Rows 4 and 1 of a batch of 6 (out of order), counts row ``i`` for ``rows[i]``."""
    big, counts, seen, (pres, freq, rep) = _case(6, 2, 700, seed=3)
    rows = torch.tensor([4, 1], dtype=torch.int64, device=DEVICE)
    want = big.clone()
    apply_penalties(want, rows, counts, seen, pres, freq, rep)
    before = big.clone()
    apply_penalties_triton(big, rows, counts, seen, pres, freq, rep)
    torch.testing.assert_close(big, want, rtol=1e-6, atol=1e-6)
    untouched = [0, 2, 3, 5]
    assert torch.equal(big[untouched], before[untouched])
    assert torch.equal(big[4], before[4])  # count row 0 holds the neutral penalties
    assert not torch.equal(big[1], before[1])


def test_half_precision_logits_are_penalised_in_float32() -> None:
    logits, counts, seen, (pres, freq, rep) = _case(3, 3, 513, seed=5, dtype=torch.bfloat16)
    want = logits.float()
    apply_penalties(want, None, counts, seen, pres, freq, rep)
    apply_penalties_triton(logits, None, counts, seen, pres, freq, rep)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), want.to(torch.bfloat16).float(), rtol=1e-2,
                               atol=1e-2)


def test_no_rows_is_a_no_op_and_bad_arguments_are_refused() -> None:
    logits, counts, seen, (pres, freq, rep) = _case(2, 2, 64, seed=1)
    empty = torch.zeros(0, 64, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    before = logits.clone()
    apply_penalties_triton(logits, none, empty, None, pres[:0], freq[:0], None)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="logits must be a 2-D float tensor"):
        apply_penalties_triton(logits[0], None, counts, seen, pres, freq, rep)
    with pytest.raises(ValueError, match="output_counts must be float32"):
        apply_penalties_triton(logits, None, counts.double(), seen, pres, freq, rep)
    with pytest.raises(ValueError, match="without rows the counts need 2 rows"):
        apply_penalties_triton(logits, None, counts[:1], seen[:1], pres[:1], freq[:1], rep[:1])
    with pytest.raises(ValueError, match="rows must be a 1-D int64 index"):
        apply_penalties_triton(logits, torch.tensor([0, 1], device=DEVICE, dtype=torch.int32),
                               counts, seen, pres, freq, rep)
    with pytest.raises(ValueError, match="frequency must hold one value per penalised row"):
        apply_penalties_triton(logits, None, counts, seen, pres, freq[:1], rep)
    with pytest.raises(ValueError, match="repetition needs seen"):
        apply_penalties_triton(logits, None, counts, None, pres, freq, rep)


def test_the_graph_runner_uses_the_kernel_on_the_gpu_and_core_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``CudaGraphModelRunner.apply_penalties``: the kernel for CUDA logits, core's torch version
    for any other (the runner is not built: the method reads nothing of it)."""
    from sagellm_cuda import graphs

    calls: list[str] = []
    monkeypatch.setattr(graphs, "apply_penalties_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(graphs.ModelRunner, "apply_penalties",
                        lambda self, *a: calls.append("core"))
    runner = object.__new__(graphs.CudaGraphModelRunner)
    logits, counts, seen, (pres, freq, rep) = _case(2, 2, 64, seed=2)
    runner.apply_penalties(logits, None, counts, seen, pres, freq, rep)
    assert calls == (["triton"] if logits.is_cuda else ["core"])
