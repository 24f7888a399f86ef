"""Weight-only int8/int4 on the CPU: grids, packing, kernels, GGUF blocks, the flag, the swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sagellm import LLM
from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.layers.linear import ColumnParallelLinear, RowParallelLinear
from sagellm.layers.quant_linear import QuantizedMatmul, QuantizedWeight, quantize_linear
from sagellm.layers.registry import weight_quantizations
from sagellm.quant.apply import resolve_scheme
from sagellm.quant.gguf_blocks import int4_grid_from_blocks, stored_int4_grids, stored_scheme
from sagellm.quant.grids import Int4Grid, quantize_int4, quantize_int8
from sagellm.quant.int4 import Int4Weight
from sagellm.quant.int8 import Int8Weight
from sagellm.quant.prefill import dense_dtype
from sagellm.testing.perplexity import prompt_logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05


# -- grids and packing ------------------------------------------------------------------------


def test_int8_grid_error_is_half_a_step(w: torch.Tensor) -> None:
    g = quantize_int8(w)
    assert g.q.dtype == torch.int8 and int(g.q.abs().max()) == 127
    err = (g.dequantize() - w).abs()
    assert bool((err <= g.scale[:, None] / 2 + 1e-7).all())


def test_int4_grid_error_is_half_a_step(w: torch.Tensor) -> None:
    g = quantize_int4(w, 32)
    assert g.group == 32 and int(g.codes.max()) == 15 and int(g.codes.min()) == 0
    err = (g.dequantize() - w).abs().view(96, 4, 32)
    assert bool((err <= g.scale[..., None] / 2 + 1e-6).all())


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="divisible by the group size"):
        quantize_int4(torch.randn(16, 48), 32)
    assert not Int4Weight.supports(24, 64) and not Int4Weight.supports(32, 48)
    with pytest.raises(ValueError, match="out divisible by 16"):
        Int4Weight(quantize_int4(torch.randn(24, 64)))


def test_int4_packing_round_trip(w: torch.Tensor) -> None:
    """Packed for the kernel and read back through it: the grid's weights, up to the bfloat16
    rounding of scales and zeros (the kernel's dtype)."""
    grid = quantize_int4(w)
    back = Int4Weight(grid).dequantize()
    ref = grid.dequantize()
    assert _rel(back, ref) < 5e-3
    # Codes survive exactly: re-deriving them from the unpacked weights gives the same ones.
    q = Int4Weight(grid)
    sz = q.scales_zeros.float()
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].t().repeat_interleave(32, dim=1)
    codes = torch.round((back - zero) / scale + 8)
    assert torch.equal(codes.to(torch.uint8), grid.codes)


@pytest.mark.parametrize("cls,bound", [(Int8Weight, 0.01), (Int4Weight, 0.12)])
def test_kernel_matches_float_reference(cls: type[QuantizedWeight], bound: float,
                                        w: torch.Tensor) -> None:
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    q = cls.from_float(w)
    y = q.matmul(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    # Against its own dequantized weight: only the bfloat16 activations differ.
    assert _rel(y, x @ q.dequantize().t()) < 1e-2
    # Against the float weight: the format's rounding error, bounded.
    assert _rel(y, x @ w.t()) < bound
    # int8: 1 byte a weight; int4: the kernel's codes (0.5), the dense path's int8 codes (1),
    # scales and zeros (0.25): under bfloat16's 2 bytes, never a float copy.
    per_weight = q.nbytes / w.numel()
    assert per_weight < (1.15 if cls is Int8Weight else 1.8)
    assert q.matmul(x.view(1, 5, 128)).shape == (1, 5, 96)


@pytest.mark.parametrize("cls", [Int8Weight, Int4Weight])
def test_long_inputs_take_the_dense_path_and_agree(cls: type[QuantizedWeight], w: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """From ``dense_min_tokens`` rows on the product is a dense GEMM on the rebuilt weight;
    it agrees with the packed kernel's product (same weight, same activation dtype)."""
    import sagellm.quant.int4 as int4_mod
    import sagellm.quant.int8 as int8_mod

    q = cls.from_float(w)
    m = q.dense_min_tokens
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(2))
    mod = int8_mod if cls is Int8Weight else int4_mod
    calls: list[int] = []
    real = mod.dense_matmul
    monkeypatch.setattr(mod, "dense_matmul", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    dense = q.matmul(x)
    packed = torch.cat([q.matmul(x[: m - 1]), q.matmul(x[m - 1:])])  # both below the threshold
    assert calls == [m]
    assert dense.dtype == torch.float32 and dense.shape == (m, 96)
    assert _rel(dense, packed) < 1e-2
    assert _rel(dense, x @ q.dequantize().t()) < 1e-2
    assert q.matmul(x.view(2, m // 2, 128)).shape == (2, m // 2, 96)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_dense_gemm_is_float32_without_native_bfloat16(fast_bf16: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without native bfloat16 (AVX2) the long-input GEMM runs in float32: emulated bfloat16 is
    slower there and coarse enough to move the int8 perplexity check past its bound."""
    import sagellm.quant.prefill as prefill

    monkeypatch.setattr(prefill, "has_fast_bf16", lambda: fast_bf16)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(32, 256, generator=g), torch.randn(64, 256, generator=g)
    scale = torch.rand(64, generator=g) + 0.5
    assert prefill.dense_dtype() == (torch.bfloat16 if fast_bf16 else torch.float32)
    y = prefill.dense_matmul(x, w, scale)
    exact = (x @ w.t()) * scale
    assert y.dtype == torch.float32
    err = _rel(y, exact)
    assert (1e-4 < err < 1e-2) if fast_bf16 else err < 1e-6, err
    q = Int4Weight.from_float(w)
    assert q.dense_weight().dtype == prefill.dense_dtype()


@pytest.mark.parametrize("rows", [3, 20])  # the packed kernel and the dense path
def test_int8_lm_head_recomputes_its_top_logits_in_float32(rows: int) -> None:
    """bfloat16 logits tie near-ties (one step is 0.125 at a logit of 20); an LM head's top
    logits come back at float32 resolution, so argmax and the top logprobs follow the grid."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4096, 128, generator=g) * 0.3
    x = torch.randn(rows, 128, generator=g) * 4
    plain = Int8Weight.from_float(w)
    head = Int8Weight.from_float(w)
    head.as_lm_head()
    exact = x @ head.dequantize().t()
    y, y_plain = head.matmul(x), plain.matmul(x)
    top = exact.topk(8, dim=-1).indices
    assert torch.allclose(y.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-4)
    assert torch.equal(y.argmax(-1), exact.argmax(-1))
    if rows < plain.dense_min_tokens or dense_dtype() == torch.bfloat16:  # bfloat16 logits
        assert float((y_plain.gather(1, top) - exact.gather(1, top)).abs().max()) > 1e-3
    assert head.matmul(x.view(1, rows, 128)).shape == (1, rows, 4096)


def test_int4_dense_weight_is_the_kernels_weight(w: torch.Tensor) -> None:
    """The dense path's int8 codes, scaled and shifted, are the weight the kernel multiplies by:
    every code comes back (codes 0 and 15, the ends of the signed range, included)."""
    grid = quantize_int4(w)
    q = Int4Weight(grid)
    dense = q.dense_weight()
    assert dense.dtype == dense_dtype() and dense.shape == (96, 128)
    sz = q.scales_zeros.float()
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].t().repeat_interleave(32, dim=1)
    codes = torch.round((dense.float() - zero) / scale + 8)
    assert torch.equal(codes.to(torch.uint8), grid.codes)
    assert {0, 15} <= set(grid.codes.unique().tolist())
    assert _rel(dense.float(), q.dequantize()) < 5e-3


# -- the swap ---------------------------------------------------------------------------------


def test_quantize_linear_keeps_bias_and_class(w: torch.Tensor) -> None:
    lin = ColumnParallelLinear(128, 96, bias=True)
    lin.weight.data.copy_(w)
    lin.bias.data.normal_()
    x = torch.randn(3, 128)
    ref = lin(x)
    quantize_linear(lin, Int8Weight.from_float(w))
    assert isinstance(lin, ColumnParallelLinear) and isinstance(lin, QuantizedMatmul)
    assert "weight" not in dict(lin.named_parameters())
    assert _rel(lin(x), ref) < 1e-2
    with pytest.raises(TypeError, match="not an unquantized"):
        quantize_linear(lin, Int8Weight.from_float(w))
    row = RowParallelLinear(128, 96)
    quantize_linear(row, Int8Weight.from_float(w))
    assert type(row).__name__ == "QuantizedRowParallelLinear"


# -- the flag and the backends ----------------------------------------------------------------


def test_flag_validation() -> None:
    assert EngineConfig().quantization == "none"
    with pytest.raises(ValidationError, match="quantization"):
        EngineConfig(quantization="fp4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a scheme"):
        resolve_scheme("int3", {}, "cpu", None)


def test_unsupported_scheme_names_the_backend() -> None:
    with pytest.raises(ValueError, match=r"'int4' is not supported by the npu backend \(it runs: none\)"):
        resolve_scheme("int4", {}, "npu", "int4")
    # auto never fails: without the scheme, or without fast kernels, weights run as loaded.
    assert resolve_scheme("auto", {}, "npu", "int4") == "none"
    assert resolve_scheme("auto", {"int4": Int4Weight}, "cpu", None) == "none"
    assert resolve_scheme("none", {"int4": Int4Weight}, "cpu", "int4") == "none"


def test_cpu_registers_int8_and_int4() -> None:
    from sagellm.quant.fp8 import Fp8Weight

    assert weight_quantizations(CpuPlatform()) == {"int8": Int8Weight, "int4": Int4Weight,
                                                   "fp8": Fp8Weight}


def test_registry_refuses_bad_registrations() -> None:
    class Bad(CpuPlatform):
        def register_quantizations(self, register):  # type: ignore[no-untyped-def]
            register(Int8Weight)
            register(Int8Weight)

    with pytest.raises(ValueError, match="two int8 quantizations"):
        weight_quantizations(Bad())

    class NotAWeight(CpuPlatform):
        def register_quantizations(self, register):  # type: ignore[no-untyped-def]
            register(dict)

    with pytest.raises(TypeError, match="must subclass"):
        weight_quantizations(NotAWeight())


def test_engine_refuses_scheme_its_backend_lacks(tiny_llama_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CpuPlatform, "register_quantizations", lambda self, register: None)
    with pytest.raises(ValueError, match="'int8' is not supported by the cpu backend"):
        LLM(model=str(tiny_llama_dir), quantization="int8")


# int4 on random Gaussian weights (no outlier structure, 16 levels per group of 32) is far
# coarser than on trained ones: per-row cosine about 0.97, the worst row about 0.91.
@pytest.mark.parametrize("scheme,min_cos,mean_cos", [("int8", 0.999, 0.9995),
                                                     ("int4", 0.88, 0.95)])
def test_tiny_model_logits_close_to_float(tiny_llama_dir: Path, prompts, scheme: str,
                                          min_cos: float, mean_cos: float) -> None:  # type: ignore[no-untyped-def]
    ids = prompts(1, 256, lo=40, hi=41, seed=3)[0]
    ref = LLM(model=str(tiny_llama_dir), quantization="none")
    q = LLM(model=str(tiny_llama_dir), quantization=scheme)
    assert all(isinstance(m, QuantizedMatmul) for m in q.engine.model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear)))
    a, b = prompt_logits(ref.engine, ids), prompt_logits(q.engine, ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cos.min()) > min_cos and float(cos.mean()) > mean_cos, cos
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    # Random tiny weights give near-flat logits, so a few top-1 ties flip; most must not.
    assert agree >= (0.85 if scheme == "int8" else 0.6), agree


# -- GGUF blocks ------------------------------------------------------------------------------


def _q4_1_bytes(grid: Int4Grid) -> np.ndarray:
    """Q4_1 blocks of ``grid`` laid out as llama.cpp writes them."""
    rows, cols = grid.codes.shape
    nb = cols // 32
    codes = grid.codes.numpy().reshape(rows, nb, 32)
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    d = grid.scale.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    m = grid.minimum.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, nb * 20)


def test_q4_1_blocks_read_exactly(w: torch.Tensor) -> None:
    import gguf

    grid = quantize_int4(w)
    raw = _q4_1_bytes(grid)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(96, 128)
    got = int4_grid_from_blocks(raw, "Q4_1", (96, 128))
    assert torch.equal(got.codes, grid.codes)
    np.testing.assert_array_equal(got.dequantize().numpy(), ref)
    with pytest.raises(ValueError, match="not a 4-bit block type"):
        int4_grid_from_blocks(raw, "Q8_0", (96, 128))


def test_q4_0_blocks_read_exactly() -> None:
    import gguf

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (16, 64), dtype=np.uint8).reshape(16, 2, 32)
    d = rng.random((16, 2, 1), dtype=np.float32).astype(np.float16).view(np.uint8)
    raw = np.concatenate([d, (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)],
                         axis=-1).reshape(16, 36)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(16, 64)
    np.testing.assert_array_equal(int4_grid_from_blocks(raw, "Q4_0", (16, 64)).dequantize().numpy(),
                                  ref)


def test_embedded_gguf_repacks_like_its_dequantized_weights(smollm2_dir: Path) -> None:
    """The stored Q4_1 codes of the embedded model, packed for int4, stand for exactly the float
    weights the loader dequantizes (rows unpermuted the same way); requantizing those floats
    finds the same codes (llama.cpp puts each block's minimum and maximum on codes 0 and 15)."""
    from safetensors import safe_open

    from sagellm.loader.default_model import default_model_path

    path = default_model_path()
    assert stored_scheme(path) == "int4"
    cfg = {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3}
    wanted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
              "model.layers.7.mlp.down_proj.weight"}
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as fh:
        for name, grid in stored_int4_grids(path, cfg):
            if name not in wanted:
                continue
            wanted.discard(name)
            ref = fh.get_tensor(name)
            assert torch.equal(grid.dequantize(), ref), name
            assert torch.equal(quantize_int4(ref).codes, grid.codes), name
    assert not wanted
