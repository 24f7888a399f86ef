"""The Triton bitmask kernel against core's torch ``apply_token_bitmask`` (Triton's interpreter
on a machine without a GPU, see ``conftest.py``; the same tests on the GPU with ``-m gpu``
deselected or not: they run wherever Triton does)."""

from __future__ import annotations

import pytest
import torch

from sagellm.engine.constraint import apply_token_bitmask, bitmask_words
from sagellm_cuda.token_bitmask import ARGMAX_BLOCK, apply_token_bitmask_triton, masked_argmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows: int, vocab: int, mask_vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (rows, bitmask_words(mask_vocab)), generator=g,
                          dtype=torch.int64).to(torch.int32)
    words[0] = -1  # every token allowed (all bits, the sign bit included)
    if rows > 1:
        words[1] = 0  # none allowed
    return logits.to(DEVICE), words


@pytest.mark.parametrize(("vocab", "mask_vocab"), [(1000, 1000), (64, 64), (4100, 4100),
                                                   (1100, 1000), (33, 1)])
def test_kernel_matches_torch_on_every_row(vocab: int, mask_vocab: int) -> None:
    """V not a multiple of 32, exactly one word, more than one block, and padded logits wider
    than the mask (the tokens past its last word disallowed)."""
    logits, words = _case(4, vocab, mask_vocab, seed=vocab)
    want = logits.clone()
    apply_token_bitmask(want, words, None)
    apply_token_bitmask_triton(logits, words, None)
    assert torch.equal(logits.cpu(), want.cpu())
    past = 32 * words.shape[1]
    if past < vocab:
        assert torch.isneginf(logits[:, past:]).all()
    assert not torch.isneginf(logits[0, :min(past, vocab)]).any()


def test_kernel_masks_only_the_indexed_rows() -> None:
    logits, words = _case(3, 1000, 1000, seed=7)
    big = torch.randn(6, 1000, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    rows = torch.tensor([4, 0, 2], dtype=torch.int64)
    want = big.clone()
    apply_token_bitmask(want, words, rows)
    apply_token_bitmask_triton(big, words, rows.to(DEVICE))
    assert torch.equal(big.cpu(), want.cpu())
    untouched = big[[1, 3, 5]]
    assert not torch.isneginf(untouched).any()


def test_kernel_on_a_row_strided_view_and_fewer_mask_rows_than_logits() -> None:
    base = torch.randn(4, 1200, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    view = base[:, :1000]  # row stride 1200
    _, words = _case(2, 1000, 1000, seed=10)
    want = view.clone()
    apply_token_bitmask(want[:2], words, None)
    apply_token_bitmask_triton(view, words, None)
    assert torch.equal(view.cpu(), want.cpu())
    assert not torch.isneginf(base[:, 1000:]).any()


def test_kernel_refuses_bad_inputs_naming_them() -> None:
    logits, words = _case(2, 64, 64, seed=1)
    with pytest.raises(ValueError, match="logits must be a 2-D float"):
        apply_token_bitmask_triton(logits[0], words)
    with pytest.raises(ValueError, match="logits must be a 2-D float"):
        apply_token_bitmask_triton(logits.t(), words)
    with pytest.raises(ValueError, match="bitmask must be a 2-D int32"):
        apply_token_bitmask_triton(logits, words.to(torch.int64))
    with pytest.raises(ValueError, match="the bitmask has 3 rows, the logits only 2"):
        apply_token_bitmask_triton(logits, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows must be a 1-D int64 index of 2 rows"):
        apply_token_bitmask_triton(logits, words, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="rows must be a 1-D int64 index"):
        apply_token_bitmask_triton(logits, words, torch.tensor([0, 1], dtype=torch.int32))
    empty = torch.zeros(0, 2, dtype=torch.int32)
    before = logits.clone()
    apply_token_bitmask_triton(logits, empty)
    assert torch.equal(logits, before)


def _masked_then_argmax(logits: torch.Tensor, words: torch.Tensor,
                        rows: torch.Tensor | None) -> torch.Tensor:
    """The path masked_argmax replaces: core's mask on a float copy, then argmax."""
    picked = logits[: words.shape[0]] if rows is None else logits[rows]
    sub = picked.cpu().to(torch.float32, copy=True)
    apply_token_bitmask(sub, words, None)
    return sub.argmax(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("vocab", "mask_vocab"), [(1000, 1000), (64, 64), (4100, 4100),
                                                   (1100, 1000), (33, 1),
                                                   (ARGMAX_BLOCK + 31, ARGMAX_BLOCK + 31)])
def test_masked_argmax_equals_masking_then_argmax(vocab: int, mask_vocab: int,
                                                  dtype: torch.dtype) -> None:
    """Every row: all allowed, none allowed (gives 0, as argmax of an all -inf row does), random
    masks; several loop iterations and a padded vocabulary past the mask's last word."""
    logits, words = _case(5, vocab, mask_vocab, seed=vocab + 3)
    logits = logits.to(dtype)
    got = masked_argmax(logits, words)
    assert got.dtype == torch.int64 and got.device == logits.device
    assert torch.equal(got.cpu(), _masked_then_argmax(logits, words, None))
    assert got[1].item() == 0  # the row that allows nothing
    assert (got.cpu() < 32 * words.shape[1]).all()


def test_masked_argmax_breaks_ties_toward_the_first_allowed_token() -> None:
    """Equal logits (bf16 makes many) in several lanes and loop iterations: the first allowed
    index wins, as torch.argmax's first maximum; the logits are never written."""
    vocab = 3 * ARGMAX_BLOCK + 5
    logits = torch.zeros(3, vocab, device=DEVICE)
    logits[0, [7, ARGMAX_BLOCK + 7, 2 * ARGMAX_BLOCK]] = 2.0  # a tie across iterations
    logits[1, [ARGMAX_BLOCK + 9, ARGMAX_BLOCK + 3]] = 1.0  # a tie inside one iteration
    words = torch.full((3, bitmask_words(vocab)), -1, dtype=torch.int32)
    words[0, 0] = 0  # 7 disallowed: the next 2.0 wins
    words[2] = 0
    words[2, 5] = 1 << 4  # only token 164 allowed, its logit 0 like every other
    before = logits.clone()
    got = masked_argmax(logits, words).cpu().tolist()
    assert got == [ARGMAX_BLOCK + 7, ARGMAX_BLOCK + 3, 164]
    assert got == _masked_then_argmax(logits, words, None).tolist()
    assert torch.equal(logits, before)


def test_masked_argmax_reads_the_indexed_rows_of_a_strided_buffer() -> None:
    base = torch.randn(6, 1200, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    view = base[:, :1000]  # a static buffer wider than the step, as the graphs' logits
    _, words = _case(3, 1000, 1000, seed=13)
    rows = torch.tensor([4, 0, 2], dtype=torch.int64)
    got = masked_argmax(view, words, rows.to(DEVICE))
    assert torch.equal(got.cpu(), _masked_then_argmax(view, words, rows))
    assert torch.equal(masked_argmax(view, words[:2]).cpu(),
                       _masked_then_argmax(view, words[:2], None))


def test_masked_argmax_refuses_bad_inputs_naming_them() -> None:
    logits, words = _case(2, 64, 64, seed=1)
    with pytest.raises(ValueError, match="logits must be a 2-D float"):
        masked_argmax(logits[0], words)
    with pytest.raises(ValueError, match="logits must be a 2-D float"):
        masked_argmax(logits.to(torch.int32), words)
    with pytest.raises(ValueError, match="bitmask must be a 2-D int32"):
        masked_argmax(logits, words.to(torch.int64))
    with pytest.raises(ValueError, match="the bitmask has 3 rows, the logits only 2"):
        masked_argmax(logits, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows must be a 1-D int64 index of 2 rows"):
        masked_argmax(logits, words, torch.tensor([0], device=DEVICE))
    assert masked_argmax(logits, torch.zeros(0, 2, dtype=torch.int32)).shape == (0,)
