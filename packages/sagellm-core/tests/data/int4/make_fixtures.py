"""Write the 4-bit fixtures of ``test_int4_checkpoints.py`` with the formats' own libraries.

Each ``<name>.safetensors`` holds one linear as its library packs it (``layer.*``) and the
library's own dequantized weight of it (``reference``, float16 ``[out, in]``):

* ``gptq_actorder`` / ``gptq_sym``: auto-gptq 0.7.1 ``qlinear_cuda.QuantLinear.pack`` (v1 layout,
  zeros stored minus one; act-order ``g_idx`` shuffled), reference from the same module's torch
  forward (its CPU path) on an identity matrix.
* ``awq_gemm``: autoawq 0.2.9 ``WQLinear_GEMM.from_linear``, reference
  ``awq.utils.packing_utils.dequantize_gemm``.
* ``ct_group_asym`` / ``ct_channel_sym``: compressed-tensors ``PackedQuantizationCompressor``
  ``compress``, reference its ``decompress``.

auto-gptq and autoawq do not import whole with transformers 5, so the modules used are loaded
on their own (their package ``__init__`` is skipped). Run (not in CI)::

    pip install --no-deps --target /tmp/int4ref auto-gptq==0.7.1 autoawq==0.2.9 accelerate
    PYTHONPATH=/tmp/int4ref python packages/sagellm-core/tests/data/int4/make_fixtures.py
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
N, K, GROUP = 64, 256, 64


def _package(name: str) -> None:
    """An empty package ``name`` whose submodules import from the installed files."""
    top = name.split(".")[0]
    found = next((Path(p) / top for p in sys.path if (Path(p) / top / "__init__.py").is_file()),
                 None)
    assert found is not None, f"{top} is not installed"
    root = found.parent
    mod = types.ModuleType(name)
    mod.__path__ = [str(root / name.replace(".", "/"))]
    sys.modules[name] = mod


def _grid(g_idx: torch.Tensor, gen: torch.Generator, zero_lo: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K], scales [N, G] (float16), integer zeros [N, G] and the weight they make."""
    groups = K // GROUP
    codes = torch.randint(0, 16, (N, K), generator=gen)
    scales = (torch.rand(N, groups, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(zero_lo, 16, (N, groups), generator=gen)
    w = ((codes - zeros[:, g_idx]).half() * scales[:, g_idx])
    return scales, zeros, w


def gptq(name: str, actorder: bool, sym: bool, gen: torch.Generator) -> None:
    _package("auto_gptq")
    _package("auto_gptq.nn_modules")
    _package("auto_gptq.nn_modules.qlinear")
    from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear

    g_idx = torch.arange(K) // GROUP
    if actorder:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    scales, zeros, w = _grid(g_idx, gen)
    if sym:
        zeros = torch.full_like(zeros, 8)
        w = ((torch.randint(0, 16, (N, K), generator=gen) - 8).half() * scales[:, g_idx])
    linear = torch.nn.Linear(K, N, bias=False).half()
    linear.weight.data = w
    ql = QuantLinear(4, GROUP, K, N, bias=False)
    ql.pack(linear, scales.float(), zeros.float(), g_idx=g_idx.to(torch.int32))
    ref = ql(torch.eye(K, dtype=torch.float16)).t().contiguous()
    assert torch.equal(ref, w), "auto-gptq's dequantization differs from the grid it packed"
    save_file({"layer.qweight": ql.qweight, "layer.qzeros": ql.qzeros,
               "layer.scales": ql.scales, "layer.g_idx": ql.g_idx.to(torch.int32),
               "reference": ref}, str(HERE / f"{name}.safetensors"))


def awq(gen: torch.Generator) -> None:
    _package("awq")
    _package("awq.utils")
    _package("awq.modules")
    _package("awq.modules.linear")
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    scales, zeros, w = _grid(torch.arange(K) // GROUP, gen, zero_lo=0)
    linear = torch.nn.Linear(K, N, bias=False).half()
    linear.weight.data = w
    # from_linear takes scales/zeros [N, G]... and indexes them by input group: pass [G, N].
    q = WQLinear_GEMM.from_linear(linear, 4, GROUP, scales=scales.t().contiguous(),
                                  zeros=zeros.t().contiguous())
    ref = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, GROUP).t().contiguous()
    save_file({"layer.qweight": q.qweight, "layer.qzeros": q.qzeros, "layer.scales": q.scales,
               "reference": ref.half()}, str(HERE / "awq_gemm.safetensors"))


def compressed_tensors(name: str, strategy: str, symmetric: bool, gen: torch.Generator) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = GROUP if strategy == "group" else K
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=GROUP if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = K // group
    scale = (torch.rand(N, groups, generator=gen) * 0.02 + 0.001).half()
    q = torch.randint(-8, 8, (N, K), generator=gen)
    zp = torch.zeros(N, groups, dtype=torch.int8) if symmetric else \
        torch.randint(-8, 8, (N, groups), generator=gen).to(torch.int8)
    g = torch.arange(K) // group
    w = ((q - zp[:, g]).half() * scale[:, g])
    state = {"weight": w, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = zp
    packed = PackedQuantizationCompressor.compress(state, scheme)
    ref = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    out = {f"layer.{k}": v for k, v in packed.items()}
    out["reference"] = ref.half().contiguous()
    save_file(out, str(HERE / f"{name}.safetensors"))


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(16)
    gptq("gptq_actorder", actorder=True, sym=False, gen=gen)
    gptq("gptq_sym", actorder=False, sym=True, gen=gen)
    awq(gen)
    compressed_tensors("ct_group_asym", "group", False, gen)
    compressed_tensors("ct_channel_sym", "channel", True, gen)
    print("wrote", sorted(p.name for p in HERE.glob("*.safetensors")))
