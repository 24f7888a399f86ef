"""The Triton W4A16 dequant-GEMM against core's torch reference (:mod:`sagellm.quant.w4a16`).

Without a GPU, ``conftest.py`` runs Triton in its interpreter: small shapes, float32, every
path (GEMV without ``tl.dot``, split-K, prefill tiles, act-order gather, groups inside a tile).
On an H200 (``pytest -m gpu packages/sagellm-cuda/tests/test_int4_gemm.py -s``) the same run in
bf16/fp16, plus Llama-3.1-8B's shapes, CUDA-graph capture, a GPTQ checkpoint through the
engine and SmolLM2's perplexity. The decode product's speed is measured by
``benchmarks/tune_gemv.py`` (a table of achieved GB/s), not here.
"""

from __future__ import annotations

import pytest
import torch

from sagellm.quant.grids import Int4Grid, quantize_int4_zero_point
from sagellm.quant.w4a16 import W4A16Weight
from sagellm_cuda.int4_gemm import (
    TritonW4A16Weight,
    fit_stages,
    launch_config,
    stage_bytes,
    w4a16_matmul,
)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def weights(n: int, k: int, group: int, act_order: bool, seed: int = 0
            ) -> tuple[W4A16Weight, TritonW4A16Weight]:
    g = torch.Generator().manual_seed(seed)
    grid = quantize_int4_zero_point(torch.randn(n, k, generator=g), group)
    if act_order:
        grid = Int4Grid(grid.codes, grid.scale, grid.minimum, torch.randperm(k, generator=g))
    grid = Int4Grid(*(t.to(DEV) if t is not None else None for t in
                      (grid.codes, grid.scale, grid.minimum, grid.perm)))
    return W4A16Weight(grid), TritonW4A16Weight(grid)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


CASES = [  # m, n, k, group, act_order: odd n tests the masks, k not a tile multiple too
    (1, 96, 256, 128, False), (1, 72, 192, 64, True), (4, 64, 256, 32, False),
    (16, 40, 128, 128, True), (1, 64, 160, 32, False), (40, 48, 192, 64, False),
    (70, 32, 128, 128, True), (3, 56, 96, 96, False),
]
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group,act_order", CASES)
def test_kernel_matches_reference(m: int, n: int, k: int, group: int, act_order: bool,
                                  dtype: torch.dtype) -> None:
    ref_w, tri_w = weights(n, k, group, act_order, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    out, ref = tri_w.matmul(x), ref_w.matmul(x)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_forced_split_and_tile_configs_agree() -> None:
    _, w = weights(64, 512, 128, True)
    x = torch.randn(2, 512).to(DEV, DTYPES[-1])
    w._for(x)
    outs = [w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.group,
                         dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, SPLIT_K=s, num_warps=4,
                              num_stages=2))
            for bk, s in ((128, 1), (64, 3), (32, 16))]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-2


@pytest.mark.parametrize("m,split", [(1, 1), (3, 1), (3, 4), (2, 3)])
def test_one_row_programs_and_split_reduction(m: int, split: int) -> None:
    """``BLOCK_M = 1`` (a program a row, no ``tl.dot``) for several rows, and the split-K sum
    done by the last split in the launch: exact, deterministic, the counters left at zero."""
    from sagellm_cuda.split_k import split_counters

    ref_w, w = weights(40, 512, 64, act_order=m == 3, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(9)).to(DEV, DTYPES[0])
    w._for(x)
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=2)
    out = w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.group, cfg)
    assert out.shape == (m, 40) and rel_err(out, ref_w.matmul(x)) < 1e-5
    assert not split_counters(x.device).any()
    assert torch.equal(w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.group, cfg), out)


@pytest.mark.parametrize("group,block_k,act_order", [(32, 128, False), (64, 128, True),
                                                      (32, 256, False), (64, 64, False),
                                                      (96, 64, False)])
def test_one_row_tiles_over_several_groups(group: int, block_k: int, act_order: bool) -> None:
    """A one-row tile holding several whole groups sums each group before its scale and zero
    apply (``tile_groups``); one that cannot (a group of 96 in a 64-wide tile) dequantizes each
    weight. Both against the reference, split and with the last tile past K."""
    from sagellm_cuda.int4_gemm import tile_groups

    assert tile_groups(block_k, group) == (block_k // group if block_k % group == 0 and
                                           block_k > group else 1 if group % block_k == 0
                                           else 0)
    k = 4 * 96 * 2  # 768: a multiple of every group here, not of 256 * splits
    ref_w, w = weights(50, k, group, act_order, seed=group + block_k)
    for dtype in DTYPES:
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
        w._for(x)
        ref = ref_w.matmul(x)
        for split in (1, 3):
            out = w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.group,
                               dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=split,
                                    num_warps=4, num_stages=2))
            assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2), (dtype,
                                                                                    split)


def test_split_past_k_never_reads_the_group_row_after_the_last() -> None:
    """A split whose last tiles lie past K must not read the (nonexistent) group row after the
    last one: here that memory holds NaN, as stale device memory can, and the output must not
    see it. (On the GPU an unmasked read there made M=1 outputs NaN.)"""
    _, w = weights(64, 512, 128, False)
    x = torch.randn(1, 512).to(DEV, DTYPES[-1])
    w._for(x)
    groups, n = w.scales.shape
    pad_s = torch.full((groups + 1, n), float("nan"), dtype=w.scales.dtype, device=DEV)
    pad_z = torch.full((groups + 1, n), float("nan"), dtype=w.zeros.dtype, device=DEV)
    pad_s[:groups], pad_z[:groups] = w.scales, w.zeros
    ref = w4a16_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.group,
                       dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4,
                            num_stages=2))
    # K=512, BLOCK_K=64, 3 splits of 192: the last split's third tile starts at k=512.
    for m_block in (1, 16):
        out = w4a16_matmul(x, w.qweight, pad_s[:groups], pad_z[:groups], w.perm, w.group,
                           dict(BLOCK_M=m_block, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3,
                                num_warps=4, num_stages=2))
        assert rel_err(out, ref) < 1e-2


def test_launch_config_fills_the_gpu_at_decode() -> None:
    cfg = launch_config(1, 4096, 4096, 128, 132)
    assert cfg["BLOCK_M"] == 1 and cfg["SPLIT_K"] > 1
    assert (4096 // cfg["BLOCK_N"]) * cfg["SPLIT_K"] >= 2 * 132
    assert launch_config(512, 4096, 4096, 128, 132)["SPLIT_K"] == 1
    assert launch_config(8, 4096, 4096, 32, 132)["BLOCK_K"] == 32


def test_launch_config_keeps_its_stages_within_shared_memory() -> None:
    h200 = 232448
    for m in (1, 2, 16, 512):
        for n, k in LLAMA_8B:
            cfg = launch_config(m, n, k, 128, 132, h200)
            per = stage_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], 128)
            assert 1 <= cfg["num_stages"] and cfg["num_stages"] * per <= h200 - 8 * 1024
    # A decode tile stages each packed word once (16 word rows x 128 outputs: 8 KiB of words
    # a stage), so its 4 stages fit; a prefill tile stages a word per input row.
    assert stage_bytes(1, 128, 128, 128) == 4 * 16 * 128 + 2 * 128 + 4 * 128
    assert stage_bytes(64, 128, 64, 128) == 4 * 64 * 128 + 2 * 64 * 64 + 4 * 128
    assert launch_config(1, 4096, 4096, 128, 132, h200)["num_stages"] == 4
    assert launch_config(1, 4096, 4096, 128, 132, 24 * 1024)["num_stages"] == 1
    assert launch_config(512, 4096, 4096, 128, 132, h200)["num_stages"] == 3
    assert launch_config(512, 4096, 4096, 128, 132, 100 * 1024)["num_stages"] == 1
    assert fit_stages(dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, num_stages=4), 32, h200)[
        "num_stages"] == 4


def test_a_launch_refused_for_shared_memory_retries_with_fewer_stages(monkeypatch) -> None:
    from triton.runtime.errors import OutOfResources

    from sagellm_cuda import int4_gemm

    tried: list[int] = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, num_stages: int, **kw):
                tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(240000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(int4_gemm, "_w4a16_kernel", Kernel())
    monkeypatch.setattr(int4_gemm, "_STAGE_OVERRIDES", {})
    consts = dict(GROUP=128, HAS_PERM=False, USE_DOT=False, IEEE=False)
    cfg = dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    int4_gemm._launch((1, 1, 1), (), consts, cfg)
    assert tried == [4, 3, 2]
    int4_gemm._launch((1, 1, 1), (), consts, cfg)  # remembered: straight to 2
    assert tried[3:] == [2]

    class Never(Kernel):
        def __getitem__(self, grid):
            def launch(*args, num_stages: int, **kw):
                raise OutOfResources(240000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(int4_gemm, "_w4a16_kernel", Never())
    with pytest.raises(OutOfResources):
        int4_gemm._launch((1, 1, 1), (), dict(consts, GROUP=64), cfg)


def test_empty_batch() -> None:
    _, w = weights(32, 64, 32, False)
    x = torch.zeros(0, 64, device=DEV)
    assert w.matmul(x).shape == (0, 32)


# -- GPU only ----------------------------------------------------------------------------------

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


@gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16, 512])
@pytest.mark.parametrize("n,k", LLAMA_8B)
def test_llama_8b_shapes_bf16(m: int, n: int, k: int) -> None:
    ref_w, tri_w = weights(n, k, 128, act_order=m == 2)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    assert rel_err(tri_w.matmul(x), ref_w.matmul(x)) < 1e-2


@gpu
def test_cuda_graph_capture_and_replay() -> None:
    _, w = weights(4096, 4096, 128, act_order=True)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    expect = w.matmul(x)  # warm-up: compiles, converts scales
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w.matmul(x)
    x.copy_(torch.randn_like(x))
    expect = w.matmul(x.clone())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expect)


@gpu
def test_smollm2_perplexity_on_gpu() -> None:
    """SmolLM2 on CUDA: bf16 as loaded vs ``quantization=auto`` (W4A16 from the GGUF's Q4_1
    grids through the Triton kernel), within 10%."""
    from pathlib import Path

    from sagellm import LLM
    from sagellm.layers.quant_linear import QuantizedMatmul
    from sagellm.testing.perplexity import perplexity

    text = (Path(__file__).parents[2] / "sagellm-core" / "tests" / "data" /
            "declaration_of_independence.txt").read_text()
    # A small KV pool each: both engines live in this process (the default pool, 0.85 of the
    # card, would leave the second engine none).
    ref_llm = LLM(model=None, backend="cuda", quantization="none", enforce_eager=True,
                  num_kv_blocks=1024)
    ids = ref_llm.tokenizer(text).input_ids
    ref = perplexity(ref_llm.engine, ids)
    ref_llm.engine.shutdown()
    del ref_llm
    q = LLM(model=None, backend="cuda", quantization="auto", enforce_eager=True, num_kv_blocks=1024)
    mods = [m for m in q.engine.model.modules() if isinstance(m, QuantizedMatmul)]
    assert len(mods) == 30 * 4 and all(isinstance(m.qweight, TritonW4A16Weight) for m in mods)
    ppl = perplexity(q.engine, ids)
    print(f"SmolLM2 on CUDA: bf16 {ref:.3f}, W4A16 {ppl:.3f} ({ppl / ref - 1:+.2%})")
    assert abs(ppl / ref - 1) < 0.10


@gpu
def test_gptq_checkpoint_on_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A GPTQ act-order checkpoint: the engine's CUDA int4 (repacked) against the same
    checkpoint loaded as float, greedy tokens and logits."""
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.layers.quant_linear import QuantizedMatmul
    from sagellm.testing.int4_writer import write_int4_checkpoint
    from sagellm.testing.perplexity import prompt_logits
    from sagellm.testing.tiny_model import make_tiny_llama

    qdir = write_int4_checkpoint(make_tiny_llama(tmp_path / "f"), tmp_path / "q", "gptq", 32,
                                 act_order=True)
    ids = [1, 17, 33, 90, 5, 200, 44, 3]
    outs = {}
    for quant in ("none", "auto"):
        e = LLMEngine(EngineConfig(model=str(qdir), backend="cuda", quantization=quant,
                                   dtype="float16", num_kv_blocks=16, max_model_len=64))
        n_q = sum(isinstance(m, QuantizedMatmul) for m in e.model.modules())
        assert n_q == (2 * 4 if quant == "auto" else 0)
        outs[quant] = prompt_logits(e, ids)
    assert rel_err(outs["auto"], outs["none"]) < 1e-2
