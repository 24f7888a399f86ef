"""FP8 checkpoints in publishers' layouts, written here from a tiny random Llama, loaded, and
compared with the dequantized reference.

* transformers' ``quant_method: "fp8"``: per-tensor ``weight_scale`` with a static
  ``input_scale``, and block-wise ``weight_block_size`` with ``weight_scale_inv`` (written by
  hand: transformers quantizes these on a GPU only);
* compressed-tensors ``float-quantized``, per channel (dynamic activations) and per tensor
  (static), written by the ``compressed-tensors`` library itself, whose decompression (through
  transformers) is the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sagellm import LLM
from sagellm.layers.quant_linear import QuantizedMatmul
from sagellm.quant.fp8_grid import FP8_DTYPE, quantize_fp8, quantize_fp8_blocks
from sagellm.testing.perplexity import prompt_logits

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = (32, 32)


def _is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.split(".")[-2] in PROJ


def _write(src: Path, dst: Path, tensors: dict[str, torch.Tensor], qc: dict) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if qc:
        config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _hf_fp8(src: Path, dst: Path, layout: str) -> tuple[Path, Path]:
    """``(fp8 checkpoint, float checkpoint of its dequantized weights)``."""
    state = load_file(str(src / "model.safetensors"))
    fp8, ref = {}, {}
    for name, w in state.items():
        if not _is_linear(name):
            fp8[name] = ref[name] = w
            continue
        prefix = name.removesuffix(".weight")
        if layout == "tensor":
            g = quantize_fp8(w.reshape(1, -1))
            q, s = g.q.view(w.shape), g.scale.reshape(())
            fp8[name], fp8[f"{prefix}.weight_scale"] = q, s
            fp8[f"{prefix}.input_scale"] = torch.tensor(0.004 + 0.001 * len(prefix) % 3)
            ref[name] = q.float() * s
        else:
            q, s = quantize_fp8_blocks(w, BLOCK)
            fp8[name], fp8[f"{prefix}.weight_scale_inv"] = q, s
            ref[name] = q.float() * s.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    qc = ({"quant_method": "fp8", "activation_scheme": "static"} if layout == "tensor" else
          {"quant_method": "fp8", "activation_scheme": "dynamic",
           "weight_block_size": list(BLOCK)})
    return _write(src, dst / f"fp8-{layout}", fp8, qc), _write(src, dst / f"ref-{layout}", ref, {})


@pytest.fixture(scope="module", params=["tensor", "block"])
def hf_fp8(request: pytest.FixtureRequest, tiny_llama_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    d = tmp_path_factory.mktemp("hf-fp8")
    return (request.param, *_hf_fp8(tiny_llama_dir, d, request.param))


def _ids() -> list[int]:
    return torch.randint(2, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()


def test_fp8_checkpoint_runs_dequantized_under_none(hf_fp8: tuple[str, Path, Path]) -> None:
    _, fp8_dir, ref_dir = hf_fp8
    a = prompt_logits(LLM(model=str(fp8_dir), quantization="none").engine, _ids())
    b = prompt_logits(LLM(model=str(ref_dir), quantization="none").engine, _ids())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp8_scheme_runs_the_stored_codes(hf_fp8: tuple[str, Path, Path]) -> None:
    layout, fp8_dir, ref_dir = hf_fp8
    stored = load_file(str(fp8_dir / "model.safetensors"))
    ref_state = load_file(str(ref_dir / "model.safetensors"))
    llm = LLM(model=str(fp8_dir), quantization="fp8")
    model = llm.engine.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedMatmul) and qkv.qweight.scheme == "fp8"
    p = "model.layers.0.self_attn"
    want = torch.cat([stored[f"{p}.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(qkv.qweight.grid.q.view(torch.uint8), want.view(torch.uint8))
    deq = torch.cat([ref_state[f"{p}.{x}_proj.weight"] for x in "qkv"])
    torch.testing.assert_close(qkv.qweight.dequantize(), deq, rtol=0, atol=0)
    down = model.layers[1].mlp.down_proj.qweight
    torch.testing.assert_close(down.dequantize(), ref_state["model.layers.1.mlp.down_proj.weight"],
                               rtol=0, atol=0)
    if layout == "tensor":
        # Fused q/k/v read one input: the largest of their static scales.
        scales = [float(stored[f"{p}.{x}_proj.input_scale"]) for x in "qkv"]
        assert float(qkv.qweight.grid.input_scale) == max(scales)
    else:
        assert qkv.qweight.grid.group == BLOCK[1] and qkv.qweight.grid.input_scale is None
    assert not isinstance(model.lm_head, QuantizedMatmul)  # the head stays float
    a = prompt_logits(llm.engine, _ids())
    b = prompt_logits(LLM(model=str(ref_dir)).engine, _ids())
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cos.min()) > 0.99, cos


def test_auto_keeps_fp8_checkpoint_dequantized_on_the_cpu(hf_fp8: tuple[str, Path, Path]) -> None:
    # The CPU's fp8 is the slow reference, so auto does not pick it.
    llm = LLM(model=str(hf_fp8[1]), quantization="auto")
    assert not any(isinstance(m, QuantizedMatmul) for m in llm.engine.model.modules())


# -- hostile checkpoints ----------------------------------------------------------------------


def _broken(tiny_llama_dir: Path, tmp_path: Path, qc: dict, drop: str | None = None) -> Path:
    fp8_dir, _ = _hf_fp8(tiny_llama_dir, tmp_path, "block")
    if drop:
        state = load_file(str(fp8_dir / "model.safetensors"))
        del state[drop]
        save_file(state, str(fp8_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = qc
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "fp8", "weight_block_size": [32]}, "weight_block_size must be two"),
    ({"quant_method": "fp8", "weight_block_size": [32, -1]}, "weight_block_size must be two"),
    ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme must be"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [32, 32]},
     "with activation_scheme static"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "config_groups"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g": {"weights": {"type": "float", "num_bits": 8, "strategy": "group"}}}},
     "strategy 'group' is not supported"),
])
def test_bad_quantization_config_names_the_field(tiny_llama_dir: Path, tmp_path: Path, qc: dict,
                                                 match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(model=str(_broken(tiny_llama_dir, tmp_path, qc)))


def test_missing_scale_names_the_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    qc = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    name = "model.layers.1.mlp.up_proj.weight_scale_inv"
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is fp8 but"):
        LLM(model=str(_broken(tiny_llama_dir, tmp_path, qc, drop=name)))


def test_wrong_block_scale_shape_names_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    qc = {"quant_method": "fp8", "weight_block_size": [16, 16]}  # scales were written for 32
    with pytest.raises(ValueError, match=r"in blocks of \[16, 16\] must be"):
        LLM(model=str(_broken(tiny_llama_dir, tmp_path, qc)))


# -- compressed-tensors, written and decompressed by the library --------------------------------


def _ct_checkpoint(tiny_llama_dir: Path, dst: Path, preset: str) -> Path:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    del ct
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    strategy = str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy))
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "weight_scale"):
                continue
            w = module.weight
            dims = (1,) if strategy == "channel" else (0, 1)
            lo, hi = w.amin(dims, keepdim=True), w.amax(dims, keepdim=True)
            scale, _ = calculate_qparams(lo.reshape(module.weight_scale.shape),
                                         hi.reshape(module.weight_scale.shape), scheme.weights)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(0.01)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(dst))
    compressor.update_config(str(dst))
    return dst


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"])
def test_compressed_tensors_fp8_matches_the_library(preset: str, tiny_llama_dir: Path,
                                                    tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = _ct_checkpoint(tiny_llama_dir, tmp_path / preset, preset)
    state = load_file(str(ckpt / "model.safetensors"))
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == FP8_DTYPE
    # The library's own decompression (transformers loads compressed-tensors through it).
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    # The library's forward fake-quantizes the activations as the scheme says (per token, or
    # the static input_scale): W8A8, which is our fp8 scheme; quantization none runs the
    # dequantized weights on float activations.
    q = LLM(model=str(ckpt), quantization="fp8")
    qkv = q.engine.model.layers[0].self_attn.qkv_proj.qweight
    assert qkv.scheme == "fp8" and (qkv.grid.input_scale is None) == (preset == "FP8_DYNAMIC")
    hf_down = hf.state_dict()["model.layers.0.mlp.down_proj.weight"].float()
    torch.testing.assert_close(q.engine.model.layers[0].mlp.down_proj.qweight.dequantize(),
                               hf_down, rtol=0, atol=0)
    w8a8 = prompt_logits(q.engine, ids)
    cos = torch.nn.functional.cosine_similarity(w8a8, ref, dim=-1)
    assert float(cos.min()) > 0.9999, cos
    float_acts = prompt_logits(LLM(model=str(ckpt), quantization="none").engine, ids)
    cos = torch.nn.functional.cosine_similarity(float_acts, ref, dim=-1)
    assert float(cos.min()) > 0.99, cos
