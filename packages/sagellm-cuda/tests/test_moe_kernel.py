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


ALIGN_CASES = [  # tokens, experts, top_k, block_m
    (1, 4, 2, 16), (1, 128, 8, 16), (7, 8, 2, 16), (40, 6, 3, 16), (33, 128, 8, 16),
    (3, 128, 8, 64),  # T * k < E
    (50, 4, 1, 64), (300, 128, 8, 32),  # more than MAX_CHUNKS_ONE_LAUNCH chunks: two launches
    (1000, 8, 2, 16), (4096, 8, 2, 128), (64, 1, 1, 16), (5, 3, 3, 16)]
if HAS_CUDA:  # Qwen3-30B-A3B's routing at prefill sizes (minutes in the interpreter)
    ALIGN_CASES += [(2048, 128, 8, 128), (8192, 128, 8, 64), (3000, 128, 8, 16)]


def _routing(tokens: int, experts: int, top_k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens * 131 + experts)
    return torch.rand(tokens, experts, generator=g).topk(top_k, -1).indices.to(DEV)


def _check_aligned(ids: torch.Tensor, experts: int, block_m: int,
                   aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """The contract on its own: every pair once, blocks of one expert, padding past the end."""
    pairs, block_expert, num_padded = aligned
    n = ids.numel()
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
        assert rows.tolist() == sorted(rows.tolist()), "pair order kept within an expert"
    assert (block_expert[used // block_m:] == experts).all()


@pytest.mark.parametrize("tokens,experts,top_k,block_m", ALIGN_CASES)
def test_align_by_expert_matches_reference(tokens: int, experts: int, top_k: int,
                                           block_m: int) -> None:
    from sagellm_cuda.moe_align import align_by_expert, align_by_expert_reference

    ids = _routing(tokens, experts, top_k)
    want = align_by_expert_reference(ids, experts, block_m)
    _check_aligned(ids, experts, block_m, want)
    got = align_by_expert(ids, experts, block_m)
    for name, g, w in zip(("sorted_pairs", "block_expert", "num_padded"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (37, 1), (700, 2)])
def test_align_all_pairs_on_one_expert(tokens: int, top_k: int) -> None:
    from sagellm_cuda.moe_align import align_by_expert, align_by_expert_reference

    experts = 16
    ids = torch.full((tokens, top_k), 5, dtype=torch.int64, device=DEV)
    ids[:, 1:] = torch.arange(6, 5 + top_k, device=DEV)  # distinct choices per token
    for block_m in (16, 64):
        want = align_by_expert_reference(ids, experts, block_m)
        got = align_by_expert(ids, experts, block_m)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), block_m
        assert int(got[2]) == top_k * -(-tokens // block_m) * block_m


def test_align_int32_ids_and_bad_block() -> None:
    from sagellm_cuda.moe_align import align_by_expert, align_by_expert_reference

    ids = _routing(9, 8, 2)
    want = align_by_expert_reference(ids, 8, 16)
    got = align_by_expert(ids.to(torch.int32), 8, 16)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    for bad in (8, 24, 0):
        with pytest.raises(ValueError, match="block_m"):
            align_by_expert(ids, 8, bad)


@pytest.mark.parametrize("tokens,experts,top_k,renormalize", [
    (1, 4, 2, True), (19, 6, 3, False), (33, 128, 8, True), (5, 60, 4, True), (16, 8, 8, False)])
def test_route_matches_select_experts(tokens: int, experts: int, top_k: int,
                                      renormalize: bool) -> None:
    from sagellm_cuda.moe_routing import route

    g = torch.Generator().manual_seed(tokens)
    logits = (torch.randn(tokens, experts, generator=g) * 3).to(DEV)
    want_w, want_ids = select_experts(logits, top_k, renormalize)
    got_w, got_ids = route(logits, top_k, renormalize)
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int32
    assert torch.equal(got_ids.long(), want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_route_edges() -> None:
    from sagellm_cuda.moe_routing import route

    w, ids = route(torch.zeros(0, 8, device=DEV), 2, True)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    tied = torch.zeros(2, 8, device=DEV)  # all equal: the lowest indices, equal weights
    w, ids = route(tied, 3, True)
    assert ids.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 3, device=DEV))
    for bad in (0, 9):
        with pytest.raises(ValueError, match="top_k"):
            route(tied, bad, True)


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
    """The three tile configurations of ``block_config`` give the same result, also with a
    different ``BLOCK_M`` for the down GEMM (the pairs aligned twice)."""
    from sagellm_cuda.moe import fused_experts
    from sagellm_cuda.moe_tiles import block_config

    x, w13, w2, logits = case(24, 4, 2, 32, 32, torch.float32, seed=3)
    weights, ids = select_experts(logits, 2, True)
    want = experts_reference(x, w13, w2, weights, ids)
    for pairs in (4, 4 * 40, 4 * 100):
        cfg = block_config(pairs, 4)
        if not HAS_CUDA:
            cfg = {**cfg, "BLOCK_N": 32, "BLOCK_K": 32}  # keep the interpreter quick
        assert rel_err(fused_experts(x, w13, w2, weights, ids, cfg), want) < 1e-4, cfg
    up = {**block_config(4, 4), "BLOCK_N": 32, "BLOCK_K": 32}
    down = {**up, "BLOCK_M": 32}
    assert rel_err(fused_experts(x, w13, w2, weights, ids, up, down), want) < 1e-4


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


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_layer_matches_core_layer(renormalize: bool) -> None:
    """The swapped layer (routing kernel + fused GEMMs) against core's torch layer."""
    from sagellm.layers.moe import MoEExperts
    from sagellm_cuda.moe import FusedMoEExperts

    x, w13, w2, logits = case(11, 6, 3, 32, 16, torch.float32, seed=5)
    core, fused = MoEExperts(6, 3, 32, 16, renormalize), FusedMoEExperts(6, 3, 32, 16, renormalize)
    for layer in (core, fused):
        layer.w13.data, layer.w2.data = w13, w2
    assert rel_err(fused(x, logits), core(x, logits)) < 1e-4
