"""Core's W4A16 layout and torch reference (what sagellm-cuda's kernel computes), and SmolLM2's
perplexity with its linears in 4 bits on that reference.

The text and the float32 reference are those of ``test_perplexity.py``. The 4-bit weights are
the embedded GGUF's own Q4_1 grids (groups of 32). Requantizing its (already 4-bit) floats round
to nearest in groups of 64/128 instead (576 inputs is not a multiple of 128) costs far more on a
135M model: measured +68% perplexity with integer zeros, +157% with float min/max zeros, so
that path has no 10% test; GPTQ calibration would be the way to close it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm import LLM
from sagellm.layers.quant_linear import QuantizedMatmul
from sagellm.quant.apply import quantize_model
from sagellm.quant.grids import Int4Grid, quantize_int4_zero_point
from sagellm.quant.w4a16 import W4A16Weight, pack_k, unpack_k
from sagellm.testing.perplexity import perplexity


def test_pack_roundtrip_and_sign_bit() -> None:
    codes = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    codes[0, 7] = 15  # bits 28-31 of a word: the int32's sign
    q = pack_k(codes)
    assert q.dtype == torch.int32 and q.shape == (8, 24) and (q < 0).any()
    assert torch.equal(unpack_k(q).t(), codes.to(torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_k(codes[:, :12])


@pytest.mark.parametrize("group,act_order", [(32, False), (64, True), (128, False)])
def test_reference_matches_the_grid(group: int, act_order: bool) -> None:
    g = torch.Generator().manual_seed(group)
    w = torch.randn(48, 256, generator=g)
    grid = quantize_int4_zero_point(w, group)
    if act_order:
        grid = Int4Grid(grid.codes, grid.scale, grid.minimum, torch.randperm(256, generator=g))
    q = W4A16Weight(grid)
    assert q.group == group
    torch.testing.assert_close(q.dequantize(), grid.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(3, 7, 256, generator=g)
    torch.testing.assert_close(q.matmul(x), x @ grid.dequantize().t(), rtol=1e-5, atol=1e-4)
    xb = x.bfloat16()
    yb = q.matmul(xb)  # scales/zeros follow the activations' dtype
    assert yb.dtype == torch.bfloat16 and q.scales.dtype == torch.bfloat16
    rel = (yb.float() - xb.float() @ grid.dequantize().t()).norm() / yb.float().norm()
    assert rel < 1e-2
    assert q.nbytes < w.numel() * 2 // 3  # 4 bits + group scales, vs 16 bits


def test_from_float_picks_a_dividing_group_and_keeps_integer_zeros() -> None:
    w = torch.randn(16, 576)
    q = W4A16Weight.from_float(w.bfloat16())
    assert q.group == 64 and q.scales.dtype == torch.bfloat16
    assert torch.equal(q.zeros.float(), q.zeros.float().round())
    assert (q.dequantize() - w).norm() / w.norm() < 0.15
    assert not W4A16Weight.supports(16, 40)
    with pytest.raises(ValueError, match="divisible by 32"):
        W4A16Weight(Int4Grid(torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 5),
                             torch.zeros(4, 5)))
    with pytest.raises(ValueError, match="divisible by the group size"):
        quantize_int4_zero_point(w, 100)


@pytest.mark.slow
def test_smollm2_w4a16_perplexity_within_10_percent(smollm2_dir: Path, perplexity_ids: list[int],
                                                    reference_perplexity: float) -> None:
    """W4A16 packed from the embedded GGUF's stored Q4_1 grids (groups of 32, the
    ``quantization=auto`` path a GPU takes for that file) against float32 as loaded."""
    from sagellm.loader.default_model import default_model_path
    from sagellm.quant.apply import checkpoint_grids

    llm = LLM(model=None, quantization="none")
    ids, ref = perplexity_ids, reference_perplexity
    grids = checkpoint_grids(str(default_model_path()), llm.engine.parts.loaded.hf_config)
    report = quantize_model(llm.engine.model, W4A16Weight, grids)
    mods = [m for m in llm.engine.model.modules() if isinstance(m, QuantizedMatmul)]
    assert report.num_linears == len(mods) == report.num_from_checkpoint == 30 * 4  # head kept
    assert {m.qweight.group for m in mods} == {32}
    ppl = perplexity(llm.engine, ids)
    print(f"SmolLM2 perplexity: float32 {ref:.3f}, W4A16 reference {ppl:.3f} "
          f"({ppl / ref - 1:+.2%})")
    assert abs(ppl / ref - 1) < 0.10, (ppl, ref)
