"""The fused layers enter core only through the layer registry, and match core's layers.

Without a GPU the Triton kernels run in the interpreter (``conftest.py``), float32 only.
"""

from __future__ import annotations

import pytest
import torch

from sagellm.layers.registry import SWAPPABLE_LAYERS, LayerKind, layer_overrides
from sagellm.testing.layers import check_layer_replacement
from sagellm_cuda.plugin import NO_FUSION_ENV, CudaPlatform

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _triton() -> None:
    pytest.importorskip("triton")


def test_cuda_registers_all_three_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_FUSION_ENV, raising=False)
    overrides = layer_overrides(CudaPlatform())
    assert set(overrides) == {spec.base for spec in SWAPPABLE_LAYERS.values()}
    monkeypatch.setenv(NO_FUSION_ENV, "1")
    assert layer_overrides(CudaPlatform()) == {}


@pytest.mark.parametrize("kind", list(LayerKind), ids=lambda k: k.value)
def test_fused_layer_matches_core(kind: LayerKind, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_FUSION_ENV, raising=False)
    overrides = layer_overrides(CudaPlatform())
    check_layer_replacement(kind, overrides[SWAPPABLE_LAYERS[kind].base], DEV, torch.float32, 2e-4)
