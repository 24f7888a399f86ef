"""Sliding-window block release on the CUDA backend.

Kernels: windowed prefill and decode with the blocks the engine frees filled with NaN and their
table entries kept (any read shows) or set to ``NO_BLOCK`` (a read would fault), block size 16,
fp32 and bf16. Engine: a tiny Mistral whose window is below, at and above the block size
generates transformers' greedy tokens (fp32), decode through the CUDA graphs, while every
running sequence holds no more blocks than its window spans, with and without preemption.
Run on a GPU machine: ``pytest -m gpu packages/sagellm-cuda/tests/test_window_blocks_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.protocols import NO_BLOCK, AttentionLayerSpec
from sagellm.testing.families import hf_greedy, save_tiny_family
from sagellm.testing.reference import make_paged_case
from sagellm.testing.window import run_windowed, window_block_bound

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("no_block", [False, True], ids=["poisoned", "no-block"])
@pytest.mark.parametrize("window", [5, 16, 23, 100])
def test_kernels_read_no_freed_block(dtype: torch.dtype, no_block: bool, window: int) -> None:
    _require_cuda()
    from sagellm_cuda.attention import TritonAttentionBackend

    bs, heads, kv_heads, dim = 16, 8, 2, 64
    dev = torch.device("cuda")
    attn = TritonAttentionBackend()
    layer = AttentionLayerSpec(sliding_window=window)
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    for kind, seq_lens, ctx in (("prefill", [300, 77, 180], [250, 40, 1]),
                                ("decode", [300, 77, 17], [299, 76, 16])):
        case = make_paged_case(seq_lens, ctx, heads, kv_heads, dim, bs, seed=window)
        kc = torch.zeros(case.num_blocks, bs, kv_heads, dim, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        for i, n in enumerate(seq_lens):
            slots = torch.tensor(case.slots(i, 0, n), device=dev)
            attn.write_kv(case.keys[i].to(dev, dtype), case.values[i].to(dev, dtype), kc, vc,
                          slots)
        freed = [max(0, c - window + 1) // bs for c in ctx]
        padded = len({len(t) for t in case.block_tables}) > 1
        for table, n in zip(case.block_tables, freed, strict=True):
            for blk in table[:n]:
                if not (blk == 0 and padded):
                    kc[blk] = float("nan")
                    vc[blk] = float("nan")
        meta = case.prefill_metadata(dev) if kind == "prefill" else case.decode_metadata(dev)
        if no_block:
            for row, n in enumerate(freed):
                meta.block_tables[row, :n] = NO_BLOCK
        query = torch.cat(case.queries).to(dev, dtype)
        scale = dim ** -0.5
        if kind == "prefill":
            key = torch.cat([k[c:] for k, c in zip(case.keys, ctx, strict=True)]).to(dev, dtype)
            value = torch.cat([v[c:] for v, c in zip(case.values, ctx, strict=True)]).to(dev, dtype)
            out = attn.prefill(query, key, value, kc, vc, meta, scale, layer=layer)
        else:
            out = attn.decode(query, kc, vc, meta, scale, layer=layer)
        torch.cuda.synchronize()
        got = out.double().cpu()
        assert torch.isfinite(got).all(), f"{kind} read a freed block"
        torch.testing.assert_close(got, case.expected(scale, layer), atol=tol, rtol=tol)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in (21, 30, 6)]


@pytest.fixture(scope="module", params=[3, 4, 6], ids=lambda w: f"window-{w}")
def mistral(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[int, Path, list[list[int]]]:
    _require_cuda()
    window = request.param
    path = save_tiny_family(tmp_path_factory.mktemp(f"mistral-w{window}"), "mistral",
                            sliding_window=window)
    return window, path, hf_greedy(path, _prompts(), NEW_TOKENS)[0]


@pytest.mark.parametrize("preempt_every", [None, 7], ids=["steady", "preempted"])
def test_engine_matches_transformers_with_bounded_blocks(mistral, preempt_every) -> None:  # type: ignore[no-untyped-def]
    from sagellm_cuda.plugin import CudaPlatform

    window, path, want = mistral
    run = run_windowed(CudaPlatform(0), path, _prompts(), NEW_TOKENS, preempt_every=preempt_every,
                       enable_prefix_caching=preempt_every is not None)
    assert run.tokens == want
    assert run.violations == [] and run.num_released_blocks > 0
    assert run.max_held_blocks <= 3 * window_block_bound(window, 4, 16)
    if preempt_every:
        assert run.num_preemptions >= 3
