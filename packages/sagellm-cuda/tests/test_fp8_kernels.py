"""The fp8 linear's kernels and paths against core's torch reference (``sagellm.quant.fp8_grid``).

Without a GPU the Triton kernels run in the interpreter (``conftest.py``) on float32
activations, fp8 tiles upcast before the dot; ``torch._scaled_mm`` runs on the CPU too. The GPU
run (``-m gpu``) adds bf16, the fp8 tensor-core dots, CUDA-graph capture and SmolLM2's
perplexity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.quant.fp8_grid import (
    Fp8Grid,
    dequantize_activations,
    grid_from_blocks,
    quantize_activations,
    quantize_fp8,
    quantize_fp8_blocks,
    reference_matmul,
)
from sagellm_cuda.fp8 import CudaFp8Weight
from sagellm_cuda.fp8_kernels import (
    fp8_gemv,
    fp8_group_gemm,
    gemv_split_k,
    quantize_rows,
)
from sagellm_cuda.split_k import split_counters

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
ACT = torch.bfloat16 if HAS_CUDA else torch.float32
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return float((a.float() - b.float()).norm() / b.float().norm())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, group: int | None, seed: int = 0) -> Fp8Grid:
    w = torch.randn(n, k, generator=_gen(seed)) * 0.05
    if group is None:
        return quantize_fp8(w.to(DEV))
    q, s = quantize_fp8_blocks(w, (group, group))
    grid = grid_from_blocks(q, s, (group, group))
    assert grid is not None
    return Fp8Grid(grid.q.to(DEV), grid.scale.to(DEV))


@pytest.mark.parametrize("m,k,group", [(3, 64, 64), (5, 96, 32), (1, 256, 128)])
def test_quantize_rows_matches_reference(m: int, k: int, group: int) -> None:
    x = (torch.randn(m, k, generator=_gen(1)) * 3).to(DEV, ACT)
    q, s = quantize_rows(x, group)
    rq, rs = quantize_activations(x.float(), group)
    torch.testing.assert_close(s, rs)
    a, b = q.float(), rq.float()
    off = a != b
    if HAS_CUDA:
        assert not off.any()
    else:
        # Triton 3.9's interpreter drops the carry when rounding up crosses a power of two
        # (124.7 -> 64, not 128); only those values may differ here.
        ref = b[off].abs()
        assert bool((torch.log2(ref) == torch.log2(ref).round()).all() and
                    (a[off].abs() == ref / 2).all()), (a[off], b[off])


@pytest.mark.parametrize("m,n,k,group,split", [
    (1, 64, 256, None, 1), (3, 48, 256, None, 2), (16, 96, 512, 128, 1), (7, 40, 256, 64, 3),
])
def test_gemv_matches_dequantized_weights(m: int, n: int, k: int, group: int | None,
                                          split: int) -> None:
    grid = _weight(n, k, group)
    x = torch.randn(m, k, generator=_gen(2)).to(DEV, ACT)
    y = fp8_gemv(x, grid.q, grid.scale, split_k=split)
    ref = x.float() @ grid.dequantize().t()  # W8A16: activations as they are
    assert y.dtype == ACT and y.shape == (m, n)
    assert _rel(y, ref) < (1e-2 if ACT == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("m,group", [(1, None), (3, None), (2, 64), (1, 128)])
@pytest.mark.parametrize("block_m,block_n,block_k,split", [
    (1, 16, 64, 1), (1, 8, 128, 3), (1, 32, 64, 4), (16, 16, 64, 3),
])
def test_gemv_configs_match_dequantized_weights(m: int, group: int | None, block_m: int,
                                                block_n: int, block_k: int, split: int) -> None:
    """Every launch shape the tuner may pick: one row a program without tl.dot, split-K
    reduced by the last split in the launch, odd N (masks), K not a multiple of the split."""
    grid = _weight(40, 320 if group is None else 256, group, seed=m)
    k = grid.q.shape[1]
    x = torch.randn(m, k, generator=_gen(7)).to(DEV, ACT)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, group or block_k),
               SPLIT_K=split, num_warps=4, num_stages=2)  # a K tile within a scale group
    counters = split_counters(torch.device(DEV))
    y = fp8_gemv(x, grid.q, grid.scale, config=cfg)
    ref = x.float() @ grid.dequantize().t()
    assert y.dtype == ACT and y.shape == (m, 40)
    assert _rel(y, ref) < (1e-2 if ACT == torch.bfloat16 else 1e-5)
    assert not counters.any(), "the last split resets its tile's counter"
    assert torch.equal(fp8_gemv(x, grid.q, grid.scale, config=cfg), y), "splits summed in order"


def test_gemv_refuses_configs_it_cannot_run() -> None:
    grid = _weight(32, 128, 32)
    x = torch.randn(1, 128, generator=_gen(8)).to(DEV, ACT)
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide the scale group 32"):
        fp8_gemv(x, grid.q, grid.scale, config=cfg)
    with pytest.raises(ValueError, match="tl.dot launch needs BLOCK_M=16"):
        fp8_gemv(x, grid.q, grid.scale, config=dict(cfg, BLOCK_M=16, BLOCK_N=8, BLOCK_K=32))
    assert fp8_gemv(x[:0], grid.q, grid.scale).shape == (0, 32)


def test_gemv_split_k_fills_the_machine() -> None:
    dev = torch.device(DEV)
    assert gemv_split_k(64, 256, dev) == 1  # too short to split
    assert gemv_split_k(4096, 4096, dev) >= 1
    assert gemv_split_k(128, 16384, dev) > 1


@pytest.mark.parametrize("m,n,k,group", [(20, 64, 128, 64), (70, 136, 256, 128)])
def test_group_gemm_matches_reference(m: int, n: int, k: int, group: int) -> None:
    grid = _weight(n, k, group)
    x = torch.randn(m, k, generator=_gen(3)).to(DEV, ACT)
    xq, xs = quantize_rows(x, group)
    y = fp8_group_gemm(xq, xs, grid.q, grid.scale, torch.bfloat16)
    # On the kernel's own activation codes (test_quantize_rows_matches_reference holds those
    # to the reference's; the interpreter's rounding differs at powers of two).
    ref = dequantize_activations(xq, xs) @ grid.dequantize().t()
    assert _rel(y, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 9, 33])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("static", [False, True])
def test_cuda_weight_paths_match_reference(m: int, group: int | None, static: bool) -> None:
    grid = _weight(96, 128, group, seed=4)
    if static:
        grid = Fp8Grid(grid.q, grid.scale, torch.tensor(0.02, device=DEV))
    qw = CudaFp8Weight(grid)
    x = torch.randn(2, m, 128, generator=_gen(5)).to(DEV, ACT)
    y = qw.matmul(x)
    assert y.shape == (2, m, 96) and y.dtype == ACT
    x2 = x.reshape(-1, 128).float()
    # 2m <= 16 rows run W8A16 (no activation quantization); more rows run W8A8.
    if 2 * m <= 16:
        ref = x2 @ grid.dequantize().t()
    elif static:
        ref = reference_matmul(x2, grid)
    else:  # the kernel's activation codes, as in test_group_gemm_matches_reference
        ref = dequantize_activations(*quantize_rows(x2, grid.group)) @ grid.dequantize().t()
    assert _rel(y.reshape(-1, 96), ref) < 1e-2


def test_cuda_weight_refuses_unaligned_shapes() -> None:
    assert not CudaFp8Weight.supports(24, 128) and not CudaFp8Weight.supports(32, 40)
    q, s = quantize_fp8_blocks(torch.randn(32, 64), (8, 8))
    grid = grid_from_blocks(q, s, (8, 8))
    assert grid is not None and not CudaFp8Weight.fits(grid)  # group 8: no 16-wide K tile
    assert CudaFp8Weight.from_grid(grid) is None and CudaFp8Weight.runs_fast()


# -- on the GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with fp8 (8.9+)")
@pytest.mark.parametrize("group", [None, 128])
def test_fp8_linear_captures_into_a_cuda_graph(group: int | None) -> None:
    grid = _weight(512, 1024, group, seed=6)
    qw = CudaFp8Weight(grid)
    for m in (1, 8, 64):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        eager = qw.matmul(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = qw.matmul(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, qw.matmul(x))
        assert not torch.equal(out, eager)


TEXT = (Path(__file__).parents[2] / "sagellm-core" / "tests" / "data" /
        "declaration_of_independence.txt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with fp8 (8.9+)")
def test_smollm2_fp8_perplexity_on_the_gpu() -> None:
    """bf16 vs fp8 on the GPU, the same text as the CPU check (``test_fp8_perplexity.py``)."""
    from sagellm import LLM
    from sagellm.testing.perplexity import perplexity

    # A small KV pool each: the two engines live in one process, and the first one's pool
    # (0.85 of the card by default) would leave the second none.
    ref = LLM(model=None, backend="cuda", quantization="none", enforce_eager=True,
              num_kv_blocks=1024)
    ids = ref.tokenizer(TEXT.read_text()).input_ids
    base = perplexity(ref.engine, ids)
    ref.engine.shutdown()
    del ref
    q = LLM(model=None, backend="cuda", quantization="fp8", enforce_eager=True, num_kv_blocks=1024)
    ppl = perplexity(q.engine, ids)
    print(f"SmolLM2 bf16 {base:.3f} fp8 {ppl:.3f} ({ppl / base - 1:+.2%})")
    assert abs(ppl / base - 1) < 0.10, (ppl, base)


def test_platform_offers_fp8_only_with_fp8_tensor_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from sagellm.layers.registry import weight_quantizations
    from sagellm_cuda import fp8
    from sagellm_cuda.plugin import CudaPlatform

    platform = CudaPlatform.__new__(CudaPlatform)
    monkeypatch.setattr(type(platform), "device", property(lambda self: torch.device("cuda", 0)))
    for capable in (True, False):
        monkeypatch.setattr(fp8, "fp8_capable", lambda index=0, c=capable: c)
        offered = weight_quantizations(platform)
        # Other schemes (int4) are offered whatever the tensor cores; fp8 only with them.
        assert offered.get("fp8") is (CudaFp8Weight if capable else None)
