"""The conformance suite over this package's KV pool, Triton attention, fused layers and graph
runner, hosted on the CPU (``cuda_on_cpu.py``), the kernels in Triton's interpreter. On a GPU
the real platform's parts are checked by ``test_kernels.py`` and ``test_correctness.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sagellm.protocols import Platform
from sagellm.testing import BackendSuite
from sagellm_cuda.plugin import NO_FUSION_ENV

# The root config uses --import-mode=importlib, which does not put test directories on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from cuda_on_cpu import CudaPartsOnCpu  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="hosted on the CPU only where there is no GPU")


class TestCudaPartsOnCpu(BackendSuite):
    platform_cls = CudaPartsOnCpu

    @pytest.mark.skip(reason="communication here is the CPU platform's gloo (core's own suite "
                             "runs it); NcclComm is checked in test_comm.py")
    def test_comm_two_ranks(self) -> None:
        raise AssertionError("skipped")

    # End to end with core's norm, activation and rotary layers: each fused layer is checked
    # against core's by test_layer_replacements above (and test_layers.py), and interpreting them
    # in every step would triple these tests' time. Attention and the graph runner are ours.

    def test_model_runner_from_context(self, platform: Platform, tiny_model: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(NO_FUSION_ENV, "1")
        super().test_model_runner_from_context(platform, tiny_model)

    def test_generate_matches_cpu(self, platform: Platform, tiny_model: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(NO_FUSION_ENV, "1")
        super().test_generate_matches_cpu(platform, tiny_model)
