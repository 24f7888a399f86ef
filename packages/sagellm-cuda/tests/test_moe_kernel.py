"""The fused MoE kernels against core's torch experts path (``experts_reference``).

Without a GPU, ``conftest.py`` runs Triton in its interpreter: tiny shapes, float32. On an H200
(``pytest -m gpu packages/sagellm-cuda/tests/test_moe_kernel.py``) the same tests run as CUDA
kernels in bf16 and fp16 too, plus Qwen3-30B-A3B's layer shape.
"""

from __future__ import annotations

import pytest
import torch

from sagellm.layers.moe import experts_reference, select_experts

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
         seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    logits = torch.randn(tokens, experts, generator=g)
    return tuple(t.to(DEV, dtype) for t in (x, w13, w2, logits))


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [
    (1, 4, 2, 16), (7, 8, 2, 16), (40, 6, 3, 16), (33, 128, 8, 16), (50, 4, 1, 64)])
def test_align_by_expert(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    from sagellm_cuda.moe import align_by_expert

    g = torch.Generator().manual_seed(tokens)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, -1).indices.to(DEV)
    pairs, block_expert, num_padded = align_by_expert(ids, experts, block_m)
    n = tokens * top_k
    used = int(num_padded.item())
    assert used % block_m == 0 and used <= pairs.numel()
    real = pairs[pairs < n].cpu()
    assert sorted(real.tolist()) == list(range(n)), "every pair exactly once"
    assert (pairs[used:] == n).all()
    flat = ids.reshape(-1).cpu()
    for b in range(used // block_m):
        rows = pairs[b * block_m:(b + 1) * block_m].cpu()
        rows = rows[rows < n]
        assert len(rows) > 0, "no all-padding block inside the used range"
        assert (flat[rows.long()] == int(block_expert[b])).all(), "a block is one expert's"
    assert (block_expert[used // block_m:] == experts).all()


SHAPES = [  # tokens, experts, top_k, hidden, inter: odd sizes test the masks
    (1, 4, 2, 32, 16), (7, 8, 2, 64, 48), (19, 6, 3, 40, 24), (64, 4, 4, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_experts_match_reference(shape: tuple[int, ...], dtype: torch.dtype,
                                       renormalize: bool) -> None:
    from sagellm_cuda.moe import fused_experts

    tokens, experts, top_k, hidden, inter = shape
    x, w13, w2, logits = case(*shape, dtype)
    weights, ids = select_experts(logits, top_k, renormalize)
    # The reference in float32 on the same (rounded) inputs.
    want = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_experts(x, w13, w2, weights, ids)
    assert got.shape == (tokens, hidden) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype], rel_err(got, want)


def test_every_tile_config_agrees() -> None:
    """The three tile configurations of ``block_config`` give the same result."""
    from sagellm_cuda.moe import block_config, fused_experts

    x, w13, w2, logits = case(24, 4, 2, 32, 32, torch.float32, seed=3)
    weights, ids = select_experts(logits, 2, True)
    want = experts_reference(x, w13, w2, weights, ids)
    for pairs in (4, 4 * 40, 4 * 100):
        cfg = block_config(pairs, 4)
        if not HAS_CUDA:
            cfg = {**cfg, "BLOCK_N": 32, "BLOCK_K": 32}  # keep the interpreter quick
        assert rel_err(fused_experts(x, w13, w2, weights, ids, cfg), want) < 1e-4, cfg


def test_no_tokens() -> None:
    from sagellm_cuda.moe import fused_experts

    x, w13, w2, logits = case(3, 4, 2, 32, 16, torch.float32)
    weights, ids = select_experts(logits[:0], 2, True)
    assert fused_experts(x[:0], w13, w2, weights, ids).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 16, 256, 3000])
def test_qwen3_30b_a3b_layer_bf16(tokens: int) -> None:
    """Qwen3-30B-A3B's MoE layer (128 experts, top-8, hidden 2048, intermediate 768) in bf16,
    decode-sized and prefill-sized batches, also under CUDA-graph capture."""
    from sagellm_cuda.moe import fused_experts

    x, w13, w2, logits = case(tokens, 128, 8, 2048, 768, torch.bfloat16)
    weights, ids = select_experts(logits, 8, False)
    want = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_experts(x, w13, w2, weights, ids)
    assert rel_err(got, want) < TOL[torch.bfloat16]
    if tokens <= 256:
        graph = torch.cuda.CUDAGraph()
        fused_experts(x, w13, w2, weights, ids)  # warm-up outside capture (Triton JIT)
        with torch.cuda.graph(graph):
            captured = fused_experts(x, w13, w2, weights, ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, got)
