"""GPTQ, AWQ and compressed-tensors 4-bit checkpoints: read as the formats' libraries read them,
loaded by the engine (float on the CPU, or repacked into the CPU int4 kernel), hostile input.

``data/int4/*.safetensors`` were written by auto-gptq 0.7.1, autoawq 0.2.9 and
compressed-tensors 0.20 (``data/int4/make_fixtures.py``), each with the library's own
dequantized weight; the readers must reproduce it bit for bit (in float16, the libraries'
dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.layers.quant_linear import QuantizedMatmul
from sagellm.quant.apply import checkpoint_grids, stored_scheme_of
from sagellm.quant.grids import Int4Grid
from sagellm.quant.int4 import Int4Weight
from sagellm.quant.int4_checkpoints import (
    Int4Format,
    dequantized_weights,
    grid_of,
    int4_format_of,
    read_int4_format,
)
from sagellm.quant.w4a16 import W4A16Weight
from sagellm.testing.int4_writer import write_int4_checkpoint
from sagellm.testing.tiny_model import make_tiny_llama

DATA = Path(__file__).parent / "data" / "int4"
FIXTURES = {
    "gptq_actorder": Int4Format("gptq", 64, sym=False, zero_offset=1),
    "gptq_sym": Int4Format("gptq", 64, sym=True, zero_offset=1),
    "awq_gemm": Int4Format("awq", 64),
    "ct_group_asym": Int4Format("compressed-tensors", 64, sym=False),
    "ct_channel_sym": Int4Format("compressed-tensors", -1, sym=True),
}


def fixture(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    t = load_file(str(DATA / f"{name}.safetensors"))
    parts = {k.removeprefix("layer."): v for k, v in t.items() if k.startswith("layer.")}
    return parts, t["reference"]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reads_what_the_library_wrote(name: str) -> None:
    parts, ref = fixture(name)
    grid = grid_of(FIXTURES[name], "layer", parts)
    assert torch.equal(grid.dequantize().half(), ref)
    assert (grid.perm is not None) == (name == "gptq_actorder")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_w4a16_reference_and_cpu_int4_multiply_by_the_library_weight(name: str) -> None:
    parts, ref = fixture(name)
    grid = grid_of(FIXTURES[name], "layer", parts)
    x = torch.randn(5, ref.shape[1], generator=torch.Generator().manual_seed(1)).half()
    expect = x.float() @ ref.float().t()
    w4 = W4A16Weight(grid)
    assert torch.equal(w4.dequantize().half(), ref)
    # float16 activations: the weight in float16 is the library's, the sum in float32
    torch.testing.assert_close(w4.matmul(x).float(), expect, rtol=2e-3, atol=2e-3)
    x = x.float()
    cpu = Int4Weight.from_grid(grid)
    assert cpu is not None  # group 64 and per-channel 256 are kernel groups
    # bfloat16 activations and zeros in the CPU kernel
    rel = (cpu.matmul(x) - expect).norm() / expect.norm()
    assert rel < 2e-2, rel


# -- quantization_config ---------------------------------------------------------------------

def test_formats_from_configs() -> None:
    assert int4_format_of(None) is None
    assert int4_format_of({"quant_method": "fp8"}) is None
    assert int4_format_of({"quant_method": "gptq", "bits": 4, "group_size": 128}) == \
        Int4Format("gptq", 128, True, 1)
    assert int4_format_of({"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False,
                           "checkpoint_format": "gptq_v2"}) == Int4Format("gptq", -1, False, 0)
    assert int4_format_of({"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                           "version": "GEMM"}) == Int4Format("awq", 64)
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy":
                                                  "channel", "symmetric": True}}}}
    assert int4_format_of(ct) == Int4Format("compressed-tensors", -1, True)
    fp8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "float"}}}}
    assert int4_format_of(fp8) is None  # FP8 is not this module's


@pytest.mark.parametrize("cfg,field", [
    ({"quant_method": "gptq", "bits": 8}, "gptq.bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "gptq.group_size"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "gptq.group_size"),
    ({"quant_method": "gptq", "bits": 4, "group_size": "128"}, "gptq.group_size"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 3}, "awq.bits"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq.version"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "awq.zero_point"),
    ({"quant_method": "compressed-tensors", "config_groups": []}, "config_groups"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                          "group_size": 128}}}}, "format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "tensor"}}}}, "strategy"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64},
              "input_activations": {"num_bits": 8}}}}, "input_activations"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}},
        "b": {"weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}}}, "mix"),
    (["gptq"], "quantization_config"),
])
def test_bad_configs_name_the_field(cfg: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        int4_format_of(cfg)  # type: ignore[arg-type]


def test_bad_tensors_name_the_tensor() -> None:
    parts, _ = fixture("gptq_actorder")
    fmt = FIXTURES["gptq_actorder"]
    with pytest.raises(ValueError, match="lacks qzeros"):
        grid_of(fmt, "layer", {k: v for k, v in parts.items() if k != "qzeros"})
    with pytest.raises(ValueError, match="layer.qzeros has shape"):
        grid_of(fmt, "layer", {**parts, "qzeros": parts["qzeros"][:, :4]})
    with pytest.raises(ValueError, match="layer.qweight is torch.float32"):
        grid_of(fmt, "layer", {**parts, "qweight": parts["qweight"].float()})
    with pytest.raises(ValueError, match="layer.qzeros has shape .4, 8., expected .3, 8."):
        grid_of(fmt, "layer", {**parts, "scales": parts["scales"][:3]})
    with pytest.raises(ValueError, match="g_idx has shape"):
        grid_of(fmt, "layer", {**parts, "g_idx": parts["g_idx"][:10]})
    uneven = torch.zeros_like(parts["g_idx"])
    uneven[:8] = 1
    with pytest.raises(ValueError, match="exactly 64 inputs in each"):
        grid_of(fmt, "layer", {**parts, "g_idx": uneven})
    ct, _ = fixture("ct_group_asym")
    ctf = FIXTURES["ct_group_asym"]
    with pytest.raises(ValueError, match="weight_shape"):
        grid_of(ctf, "layer", {**ct, "weight_shape": torch.tensor([64, 999])})
    with pytest.raises(ValueError, match="lacks weight_zero_point"):
        grid_of(ctf, "layer", {k: v for k, v in ct.items() if k != "weight_zero_point"})
    with pytest.raises(ValueError, match="symmetric"):
        grid_of(FIXTURES["ct_channel_sym"], "layer", ct)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        grid_of(Int4Format("awq", 96), "layer", fixture("awq_gemm")[0])


def test_dequantized_stream_keeps_other_tensors() -> None:
    parts, ref = fixture("awq_gemm")
    stream = [("a.norm.weight", torch.ones(3))] + [(f"m.l.{k}", v) for k, v in parts.items()]
    out = dict(dequantized_weights(stream, FIXTURES["awq_gemm"]))
    assert set(out) == {"a.norm.weight", "m.l.weight"}
    assert torch.equal(out["m.l.weight"].half(), ref)


# -- whole checkpoints through the engine -------------------------------------------------------

@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("float"))


def engine(model: Path, quantization: str) -> LLMEngine:
    from sagellm.backends.cpu import CpuPlatform

    cfg = EngineConfig(model=str(model), quantization=quantization, num_kv_blocks=16,
                       max_model_len=64)
    return LLMEngine(cfg, platform=CpuPlatform())


def logits(e: LLMEngine, ids: list[int]) -> torch.Tensor:
    from sagellm.testing.perplexity import prompt_logits

    return prompt_logits(e, ids)


IDS = [1, 17, 33, 90, 5, 200, 44, 3, 128, 64, 250, 9]


@pytest.mark.parametrize("method,act_order", [("gptq", True), ("gptq", False), ("awq", False),
                                              ("compressed-tensors", True)])
def test_checkpoint_loads_as_its_dequantized_weights(float_dir: Path, tmp_path: Path,
                                                     method: str, act_order: bool) -> None:
    qdir = write_int4_checkpoint(float_dir, tmp_path / method, method, 32, act_order)
    assert stored_scheme_of(str(qdir)) == "int4"
    fmt = read_int4_format(qdir)
    assert fmt is not None and fmt.method == method and fmt.group == 32
    grids = checkpoint_grids(str(qdir), None)
    assert len(grids) == 2 * 7
    g = grids["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(g, Int4Grid) and (g.perm is not None) == act_order
    as_float = engine(qdir, "none")
    assert not any(isinstance(m, QuantizedMatmul) for m in as_float.model.modules())
    ref = logits(as_float, IDS)
    # The loaded weights are the float model's within 4-bit, group-32 rounding.
    src = load_file(str(float_dir / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"]
    got = as_float.model.layers[1].self_attn.o_proj.weight  # type: ignore[index]
    assert torch.equal(as_float.model.layers[1].mlp.down_proj.weight,  # type: ignore[index]
                       g.dequantize())
    assert 0 < (got - src).norm() / src.norm() < 0.1
    # Repacked into the CPU int4 kernel from the stored codes: same weights, bf16 activations.
    packed = engine(qdir, "int4")
    mods = [m for m in packed.model.modules() if isinstance(m, QuantizedMatmul)]
    assert len(mods) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the head (int8)
    down = packed.model.layers[1].mlp.down_proj.qweight  # type: ignore[index]
    assert isinstance(down, Int4Weight) and down.group == 32
    assert (down.perm is not None) == act_order
    torch.testing.assert_close(down.dequantize(), g.dequantize(), rtol=0, atol=2e-2)
    out = logits(packed, IDS)
    assert (out - ref).norm() / ref.norm() < 0.03


def test_checkpoint_auto_and_grids_for_w4a16(float_dir: Path, tmp_path: Path) -> None:
    """What a GPU backend's int4 gets: W4A16 weights packed from the stored grids (here core's
    torch reference of the kernel), equal to the dequantized checkpoint."""
    from sagellm.quant.apply import quantize_model

    qdir = write_int4_checkpoint(float_dir, tmp_path / "g", "gptq", 32, act_order=True)
    e = engine(qdir, "none")
    ref = logits(e, IDS)
    report = quantize_model(e.model, W4A16Weight, checkpoint_grids(str(qdir), None))
    assert report.num_linears == 2 * 4 and report.num_from_checkpoint == 2 * 4  # head kept
    assert not isinstance(e.model.lm_head, QuantizedMatmul)
    torch.testing.assert_close(logits(e, IDS), ref, rtol=1e-4, atol=1e-4)


def test_act_order_fused_parts_must_agree(float_dir: Path, tmp_path: Path) -> None:
    from sagellm.quant.apply import quantize_model

    qdir = write_int4_checkpoint(float_dir, tmp_path / "a", "gptq", 32, act_order=True)
    e = engine(qdir, "none")
    grids = dict(checkpoint_grids(str(qdir), None))
    name = "model.layers.0.self_attn.k_proj.weight"
    grids[name] = Int4Grid(grids[name].codes, grids[name].scale, grids[name].minimum,
                           torch.arange(grids[name].codes.shape[1]).flip(0))
    with pytest.raises(ValueError, match="different act-order input orders"):
        quantize_model(e.model, W4A16Weight, grids)


def test_unsupported_checkpoint_is_refused_at_load(float_dir: Path, tmp_path: Path) -> None:
    qdir = write_int4_checkpoint(float_dir, tmp_path / "bad", "awq", 32)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="awq.version 'gemv' is not supported"):
        engine(qdir, "none")
