"""Each Triton kernel against a torch fp32 reference on random inputs, over many shapes.

On a GPU machine they run as CUDA kernels over every dtype (``pytest -m gpu ...`` selects them);
without one, ``conftest.py`` switches Triton to its interpreter and the float32 cases run on the
CPU in CI (same kernel programs, checked against the same references).
"""

from __future__ import annotations

import pytest
import torch

from sagellm.backends.torch_attention import TorchAttentionBackend, gather_kv
from sagellm.layers.activation import SiluAndMul
from sagellm.layers.norm import RMSNorm
from sagellm.layers.rotary import RotaryEmbedding
from sagellm.protocols import FULL_ATTENTION, AttentionLayerSpec, DecodeMetadata, PrefillMetadata

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted
REF = TorchAttentionBackend()
DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_runs_float32_only(request: pytest.FixtureRequest) -> None:
    params = getattr(request.node, "callspec", None)
    dtype = params.params.get("dtype") if params else None
    if not HAS_CUDA and dtype not in (None, torch.float32):
        pytest.skip("the Triton interpreter run covers float32; other dtypes run on the GPU")
    case = params.params.get("case") if params else None
    if not HAS_CUDA and case is not None and case not in INTERPRETED_CASES:
        pytest.skip("too slow for the interpreter; this shape runs on the GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}[dtype]


def make_pool(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEV).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEV).to(dtype)
    return k, v


def block_tables(seq_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    need = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks)[: sum(need)]
    width = max(need) + 3
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    off = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[off:off + n]
        off += n
    return table.to(DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 128), (1, 64), (4, 32)])
def test_write_kv(dtype: torch.dtype, kv_heads: int, head_dim: int) -> None:
    from sagellm_cuda.attention import write_kv

    kc, vc = make_pool(32, 16, kv_heads, head_dim, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    qkv = torch.randn(37, (4 + 2) * kv_heads * head_dim, device=DEV).to(dtype)
    k = qkv[:, 4 * kv_heads * head_dim: 5 * kv_heads * head_dim].view(37, kv_heads, head_dim)
    v = qkv[:, 5 * kv_heads * head_dim:].view(37, kv_heads, head_dim)  # strided views, like the model
    slots = torch.randperm(32 * 16, device=DEV)[:37]
    slots[::5] = -1
    write_kv(k, v, kc, vc, slots)
    REF.write_kv(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


DECODE_CASES = [
    # heads, kv_heads, head_dim, block_size, seq_lens
    (12, 2, 128, 16, [1, 17, 768, 4000]),
    (32, 8, 128, 16, [5, 64, 65, 300]),
    (8, 8, 64, 32, [33, 1, 129]),
    (16, 2, 64, 16, [1000] * 9),
    (9, 3, 32, 16, [7, 8, 9, 255, 256, 257]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_decode(dtype: torch.dtype, case: tuple, num_splits: int | None,  # type: ignore[type-arg]
                      layer: AttentionLayerSpec = FULL_ATTENTION) -> None:
    from sagellm_cuda.attention import paged_decode

    heads, kv_heads, head_dim, bs, lens = case
    nb = sum(-(-n // bs) for n in lens) + 8
    kc, vc = make_pool(nb, bs, kv_heads, head_dim, dtype)
    table = block_tables(lens, bs, nb)
    q = torch.randn(len(lens), heads, head_dim, device=DEV).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    out = paged_decode(q, kc, vc, table, seq_lens, max(lens), scale, num_splits, layer)
    meta = DecodeMetadata(seq_lens=seq_lens, block_tables=table, max_seq_len=max(lens))
    ref = REF.decode(q.float(), kc.float(), vc.float(), meta, scale, layer)
    assert rel_err(out, ref) < tol(dtype)


PREFILL_CASES = [
    # heads, kv_heads, head_dim, block_size, context_lens, query_lens
    (12, 2, 128, 16, [0], [512]),
    (12, 2, 128, 16, [0, 0, 0], [1, 100, 257]),
    (12, 2, 128, 16, [16, 100, 700], [16, 33, 300]),
    (8, 8, 64, 32, [0, 5], [130, 64]),
    (16, 4, 64, 16, [63, 0, 1], [1, 2, 200]),
    (4, 2, 32, 16, [48], [1000]),
]


# The shapes the CPU interpreter covers: GQA and MHA, split and unsplit decode, prefill with and
# without a cached prefix, partial blocks.
INTERPRETED_CASES = [DECODE_CASES[2], DECODE_CASES[4], PREFILL_CASES[3], PREFILL_CASES[4]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_paged_prefill(dtype: torch.dtype, case: tuple,  # type: ignore[type-arg]
                       layer: AttentionLayerSpec = FULL_ATTENTION) -> None:
    from sagellm_cuda.attention import paged_prefill

    heads, kv_heads, head_dim, bs, ctx, qlens = case
    total = [c + q for c, q in zip(ctx, qlens)]
    nb = sum(-(-n // bs) for n in total) + 8
    kc, vc = make_pool(nb, bs, kv_heads, head_dim, dtype)
    table = block_tables(total, bs, nb)
    cu = [0]
    for n in qlens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], heads, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    out = paged_prefill(q, kc, vc, table, cu_t, ctx_t, max(qlens), scale, layer)
    meta = PrefillMetadata(cu_seqlens_q=cu_t, seq_lens=torch.tensor(total, device=DEV),
                           context_lens=ctx_t, block_tables=table, max_seqlen_q=max(qlens),
                           max_seqlen_k=max(total), has_prefix=any(ctx), seq_lens_list=total,
                           context_lens_list=ctx)
    k_new = torch.cat([gather_kv(kc, table[i], total[i])[ctx[i]:] for i in range(len(ctx))])
    v_new = torch.cat([gather_kv(vc, table[i], total[i])[ctx[i]:] for i in range(len(ctx))])
    ref = REF.prefill(q.float(), k_new.float(), v_new.float(), kc.float(), vc.float(), meta, scale,
                      layer)
    assert rel_err(out, ref) < tol(dtype)


#: Sliding windows shorter than the context, longer than a tile, one token; a soft-cap tight
#: enough to change the softmax (the random scores reach about +-4 here).
LAYER_SPECS = [AttentionLayerSpec(sliding_window=20), AttentionLayerSpec(sliding_window=70),
               AttentionLayerSpec(sliding_window=1), AttentionLayerSpec(logits_soft_cap=1.5),
               AttentionLayerSpec(sliding_window=20, logits_soft_cap=1.5)]


def _interpreter_runs_some_specs(layer: AttentionLayerSpec) -> None:
    # A window over several tiles, and a short one with a soft-cap: the rest run on the GPU.
    if not HAS_CUDA and layer not in (LAYER_SPECS[1], LAYER_SPECS[4]):
        pytest.skip("too slow for the interpreter; this window/cap runs on the GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer", LAYER_SPECS, ids=repr)
@pytest.mark.parametrize("case", [DECODE_CASES[4], DECODE_CASES[1]])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_decode_window_and_soft_cap(dtype: torch.dtype, case: tuple, num_splits: int | None,  # type: ignore[type-arg]
                                          layer: AttentionLayerSpec) -> None:
    _interpreter_runs_some_specs(layer)
    test_paged_decode(dtype, case, num_splits, layer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer", LAYER_SPECS, ids=repr)
@pytest.mark.parametrize("case", [PREFILL_CASES[4], PREFILL_CASES[2]])
def test_paged_prefill_window_and_soft_cap(dtype: torch.dtype, case: tuple,  # type: ignore[type-arg]
                                           layer: AttentionLayerSpec) -> None:
    _interpreter_runs_some_specs(layer)
    test_paged_prefill(dtype, case, layer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 1536), (37, 1536), (300, 576), (5, 4096)])
def test_rms_norm(dtype: torch.dtype, rows: int, hidden: int) -> None:
    from sagellm_cuda.fused import rms_norm

    norm = RMSNorm(hidden, 1e-6).to(DEV, dtype)
    norm.weight.data.normal_()
    x = torch.randn(rows, hidden, device=DEV).to(dtype)
    r = torch.randn(rows, hidden, device=DEV).to(dtype)
    out, _ = rms_norm(x, norm.weight, 1e-6)
    assert rel_err(out, RMSNorm.forward(norm, x)) < (1e-2 if dtype != torch.float32 else 1e-5)
    out, res = rms_norm(x, norm.weight, 1e-6, r)
    ref_out, ref_res = RMSNorm.forward(norm, x, r)
    assert torch.equal(res, ref_res)
    ref32 = (x.float() + r.float())
    ref32 = ref32 * torch.rsqrt(ref32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    assert rel_err(out, ref32) < tol(dtype)
    assert rel_err(out, ref_out) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,inter", [(1, 8960), (33, 8960), (257, 1536), (3, 100)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    from sagellm_cuda.fused import silu_and_mul

    x = torch.randn(rows, 2 * inter, device=DEV).to(dtype)
    ref = torch.nn.functional.silu(x[:, :inter].float()) * x[:, inter:].float()
    out = silu_and_mul(x)
    assert rel_err(out, ref) < tol(dtype)
    assert rel_err(out, SiluAndMul()(x)) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (9, 3, 64), (32, 8, 128)])
def test_rotary(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    from sagellm_cuda.fused import rotary_inplace

    rope = RotaryEmbedding(head_dim, 4096, 1e6).to(DEV)
    t = 77
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device=DEV).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)
    pos = torch.randint(0, 4096, (t,), device=DEV)
    q32, k32 = RotaryEmbedding.forward(rope, pos, q.float(), k.float())
    rq, rk = RotaryEmbedding.forward(rope, pos, q.clone(), k.clone())
    rotary_inplace(pos, q, k, rope.cos_sin)
    assert rel_err(q, q32) < tol(dtype) and rel_err(k, k32) < tol(dtype)
    # Same rounding points as core's module; fp32 FMA contraction may move the last bit only.
    same = 1e-6 if dtype == torch.float32 else 4e-3
    assert rel_err(q, rq) < same and rel_err(k, rk) < same


def test_empty_batches_launch_nothing() -> None:
    """A step without prefill (or decode) tokens calls the kernels with empty inputs: they return
    empty results of the right shape and leave the cache alone."""
    from sagellm_cuda.attention import paged_decode, paged_prefill, write_kv
    from sagellm_cuda.fused import rotary_inplace

    kc, vc = make_pool(4, 16, 2, 64, torch.float32)
    before = kc.clone()
    empty = torch.empty(0, 2, 64, device=DEV)
    write_kv(empty, empty, kc, vc, torch.empty(0, dtype=torch.int64, device=DEV))
    assert torch.equal(kc, before)
    table = torch.zeros(0, 1, dtype=torch.int32, device=DEV)
    q = torch.empty(0, 4, 64, device=DEV)
    lens = torch.empty(0, dtype=torch.int32, device=DEV)
    assert paged_decode(q, kc, vc, table, lens, 16, 0.125).shape == (0, 4, 64)
    cu = torch.zeros(1, dtype=torch.int32, device=DEV)
    assert paged_prefill(q, kc, vc, table, cu, lens, 0, 0.125).shape == (0, 4, 64)
    rope = RotaryEmbedding(64, 128, 1e4).to(DEV)
    rotary_inplace(lens.long(), q, empty, rope.cos_sin)  # nothing to rotate, nothing raised


def test_fused_rotary_falls_back_on_strided_heads() -> None:
    """q/k whose last dim is not contiguous (not how the models call it) take core's path."""
    from sagellm_cuda.fused import FusedRotaryEmbedding

    rope = FusedRotaryEmbedding(32, 64, 1e4).to(DEV)
    pos = torch.arange(5, device=DEV)
    q = torch.randn(5, 2, 32, 2, device=DEV)[..., 0]  # stride 2 along head_dim
    k = torch.randn(5, 1, 32, 2, device=DEV)[..., 0]
    ref_q, ref_k = RotaryEmbedding.forward(rope, pos, q.clone(), k.clone())
    out_q, out_k = rope(pos, q, k)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.gpu
def test_decode_in_a_cuda_graph_follows_new_lengths() -> None:
    """The captured launch must read lengths and tables from memory, not from capture time."""
    from sagellm_cuda.attention import paged_decode

    heads, kv_heads, d, bs = 12, 2, 128, 16
    kc, vc = make_pool(600, bs, kv_heads, d, torch.bfloat16)
    table = block_tables([4096, 4096], bs, 600)
    q = torch.randn(2, heads, d, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([10, 20], dtype=torch.int32, device=DEV)
    paged_decode(q, kc, vc, table, lens, 4096, d ** -0.5)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = paged_decode(q, kc, vc, table, lens, 4096, d ** -0.5)
    for new in ([1, 4096], [700, 33]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        g.replay()
        meta = DecodeMetadata(seq_lens=lens, block_tables=table, max_seq_len=max(new))
        ref = REF.decode(q.float(), kc.float(), vc.float(), meta, d ** -0.5)
        assert rel_err(out, ref) < 1.5e-2
