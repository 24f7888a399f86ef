"""apply_token_bitmask against a naive per-token reference, on CPU (and CUDA where present)."""

from __future__ import annotations

import pytest
import torch

from sagellm.structured.bitmask import allocate_bitmask, apply_token_bitmask, bitmask_words


def naive(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Token by token: allowed iff bit (t % 32) of word (t // 32) is set; no bit -> disallowed."""
    out = logits.clone()
    words = bitmask.tolist()
    for r in rows:
        for t in range(logits.shape[1]):
            w, b = divmod(t, 32)
            word = words[r][w] & 0xFFFFFFFF if w < len(words[r]) else 0
            if not (word >> b) & 1:
                out[r, t] = float("-inf")
    return out


def random_mask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = allocate_bitmask(rows, vocab)
    m.copy_(torch.randint(-(2**31), 2**31, m.shape, generator=g, dtype=torch.int64).to(torch.int32))
    return m


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 257])
def test_all_rows_match_naive(vocab: int) -> None:
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab))
    mask = random_mask(3, vocab, seed=vocab)
    mask[1, 0] = -(2**31)  # only bit 31: the sign bit
    want = naive(logits, mask, [0, 1, 2])
    apply_token_bitmask(logits, mask)
    assert torch.equal(logits, want)


def test_selected_rows_and_count() -> None:
    logits = torch.randn(4, 70)
    mask = random_mask(4, 70, seed=1)
    ref = naive(logits, mask, [1, 3])
    got = logits.clone()
    apply_token_bitmask(got, mask, rows=[1, 3])
    assert torch.equal(got, ref)
    got = logits.clone()
    apply_token_bitmask(got, mask, rows=torch.tensor([3, 1]))
    assert torch.equal(got, ref)
    got = logits.clone()
    apply_token_bitmask(got, mask, rows=2)
    assert torch.equal(got, naive(logits, mask, [0, 1]))
    got = logits.clone()
    apply_token_bitmask(got, mask, rows=[])
    assert torch.equal(got, logits)


def test_padding_rows_past_the_mask_are_disallowed() -> None:
    # A bitmask sized for a 40-token tokenizer applied to 100 logits (padded embedding rows).
    logits = torch.randn(2, 100)
    mask = allocate_bitmask(2, 40)
    apply_token_bitmask(logits, mask)
    assert torch.isfinite(logits[:, :64]).all() and torch.isinf(logits[:, 64:]).all()


def test_allocate_and_shape_checks() -> None:
    m = allocate_bitmask(2, 33)
    assert m.shape == (2, bitmask_words(33)) == (2, 2) and m.dtype == torch.int32
    assert (m == -1).all()
    with pytest.raises(ValueError):
        allocate_bitmask(1, 0)
    logits = torch.zeros(2, 33)
    with pytest.raises(ValueError, match="2-D int32"):
        apply_token_bitmask(logits, m.to(torch.int64))
    with pytest.raises(ValueError, match="batch, vocab"):
        apply_token_bitmask(logits[0], m)
    with pytest.raises(ValueError, match="row indices"):
        apply_token_bitmask(logits, m, rows=[2])
    with pytest.raises(ValueError, match="outside"):
        apply_token_bitmask(logits, m, rows=3)
    with pytest.raises(ValueError, match="bitmask has 1 rows"):
        apply_token_bitmask(logits, m[:1])


def test_half_precision_logits() -> None:
    logits = torch.randn(2, 50).to(torch.bfloat16)
    mask = random_mask(2, 50, seed=3)
    want = naive(logits.float(), mask, [0, 1])
    apply_token_bitmask(logits, mask, rows=[0, 1])
    assert torch.equal(logits.float(), want)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits = torch.randn(8, 151_936)
    mask = random_mask(8, 151_936, seed=4).pin_memory()
    want = logits.clone()
    apply_token_bitmask(want, mask, rows=[0, 2, 5])
    got = logits.cuda()
    apply_token_bitmask(got, mask, rows=[0, 2, 5])
    assert torch.equal(got.cpu(), want)
