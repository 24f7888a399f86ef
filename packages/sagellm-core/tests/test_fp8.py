"""FP8 W8A8 in core: the grid, the torch reference weight, the flag and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from sagellm import LLM
from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.layers.quant_linear import QuantizedMatmul
from sagellm.quant.apply import resolve_scheme
from sagellm.quant.fp8 import Fp8Weight
from sagellm.quant.fp8_checkpoint import fp8_format
from sagellm.quant.fp8_grid import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Grid,
    grid_from_blocks,
    quantize_activations,
    quantize_fp8,
    quantize_fp8_blocks,
    reference_matmul,
)

#: e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself.
REL_STEP = 2.0 ** -4


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05


def test_per_channel_grid_error_is_half_an_fp8_step(w: torch.Tensor) -> None:
    g = quantize_fp8(w)
    assert g.q.dtype == FP8_DTYPE and g.scale.shape == (96, 1) and g.group == 128
    assert torch.allclose(g.q.float().abs().amax(1), torch.full((96,), FP8_MAX))
    err = (g.dequantize() - w).abs()
    # Relative half step for normal values; subnormals (below 2^-6 of the scale) are absolute.
    assert bool((err <= w.abs() * REL_STEP + g.scale * 2.0 ** -10 + 1e-9).all())


def test_group_and_block_grids_agree(w: torch.Tensor) -> None:
    q, s = quantize_fp8_blocks(w, (32, 32))
    assert s.shape == (3, 4)
    g = grid_from_blocks(q, s, (32, 32))
    assert g is not None and g.group == 32 and g.scale.shape == (96, 4)
    full = s.repeat_interleave(32, 0).repeat_interleave(32, 1)
    torch.testing.assert_close(g.dequantize(), q.float() * full, rtol=0, atol=0)
    assert grid_from_blocks(q[:, :100], s, (32, 32)) is None  # inputs not whole blocks
    with pytest.raises(ValueError, match=r"must be \[3, 2\]"):
        grid_from_blocks(q[:, :64], s, (32, 32))
    # Partial edge blocks (96 rows in blocks of 64) quantize and pad correctly.
    q2, s2 = quantize_fp8_blocks(w, (64, 128))
    assert s2.shape == (2, 1) and q2.shape == w.shape


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(4, 8)), "2-D torch.float8_e4m3fn"),
    (dict(scale=torch.ones(3, 1)), r"must be \[4, G\]"),
    (dict(scale=torch.ones(4, 3)), r"must be \[4, G\]"),
    (dict(input_scale=torch.ones(2)), "one value"),
])
def test_grid_refuses_bad_tensors(bad: dict, match: str) -> None:
    args = dict(q=torch.zeros(4, 8).to(FP8_DTYPE), scale=torch.ones(4, 1), input_scale=None)
    with pytest.raises(ValueError, match=match):
        Fp8Grid(**{**args, **bad})
    with pytest.raises(ValueError, match="divisible by the group size"):
        quantize_fp8(torch.randn(4, 48), 32)


def test_activations_per_token_and_static() -> None:
    x = torch.randn(5, 64) * torch.arange(1, 6)[:, None]  # rows of different ranges
    xq, xs = quantize_activations(x, 64)
    assert xs.shape == (5, 1) and torch.allclose(xq.float().abs().amax(1), torch.full((5,), FP8_MAX))
    xq, xs = quantize_activations(x, 16)
    assert xs.shape == (5, 4)
    xq, xs = quantize_activations(x, 64, torch.tensor(0.001))
    assert xs.shape == (5, 1) and float(xq.float().abs().max()) == FP8_MAX  # clamped, not inf
    assert float(quantize_activations(torch.zeros(2, 8), 8)[0].float().abs().max()) == 0.0


def test_reference_weight_matches_float(w: torch.Tensor) -> None:
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(1))
    ref = x @ w.t()
    qw = Fp8Weight.from_float(w)
    y = qw.matmul(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (7, 96)
    assert float((y.float() - ref).norm() / ref.norm()) < 0.06
    torch.testing.assert_close(qw.matmul(x), reference_matmul(x, qw.grid))
    assert qw.nbytes == 96 * 128 + 96 * 4
    assert not Fp8Weight.runs_fast() and Fp8Weight.head_scheme == "none"


# -- the flag -----------------------------------------------------------------------------------


def test_flag_value_and_refusal() -> None:
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValidationError):
        EngineConfig(quantization="fp9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'fp8' is not supported by the npu backend "
                                         r"\(it runs: none, int8\)"):
        resolve_scheme("fp8", {"int8": Fp8Weight}, "npu", None)
    assert resolve_scheme("auto", {"fp8": Fp8Weight}, "cpu", "fp8") == "none"  # not fast here


def test_engine_refuses_fp8_on_a_backend_without_it(tiny_llama_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CpuPlatform, "register_quantizations", lambda self, register: None)
    with pytest.raises(ValueError, match=r"'fp8' is not supported by the cpu backend \(it runs: "
                                         r"none\)"):
        LLM(model=str(tiny_llama_dir), quantization="fp8")


def test_fp8_on_load_quantizes_every_linear_but_the_head(tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), quantization="fp8")
    mods = [m for m in llm.engine.model.modules() if isinstance(m, QuantizedMatmul)]
    assert len(mods) == 2 * 4 and {m.qweight.scheme for m in mods} == {"fp8"}
    assert not isinstance(llm.engine.model.lm_head, QuantizedMatmul)


def test_format_detection() -> None:
    assert fp8_format(None) is None and fp8_format({"quant_method": "gptq"}) is None
    # An integer compressed-tensors scheme is the 4-bit readers' business.
    assert fp8_format({"quant_method": "compressed-tensors", "format": "pack-quantized"}) is None
    assert fp8_format({"quant_method": "compressed-tensors", "format": "naive-quantized",
                       "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8}}}}) is None
    f = fp8_format({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                        "strategy": "block",
                                                        "block_structure": [128, 128]},
                                            "input_activations": {"dynamic": True}}}})
    assert f is not None and f.block == (128, 128) and not f.static_activations
    with pytest.raises(ValueError, match="must be an object"):
        fp8_format(["fp8"])
    with pytest.raises(ValueError, match="symmetric is false"):
        fp8_format({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                        "strategy": "channel",
                                                        "symmetric": False}}}})
    with pytest.raises(ValueError, match="needs block_structure"):
        fp8_format({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                        "strategy": "block"}}}})
    with pytest.raises(ValueError, match="one float scale per tensor"):
        fp8_format({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                        "strategy": "channel"},
                                            "input_activations": {"dynamic": False,
                                                                  "strategy": "token"}}}})
