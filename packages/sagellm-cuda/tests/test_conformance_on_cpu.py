"""The conformance suite over this package's KV pool, Triton attention, fused layers and graph
runner, hosted on the CPU (``cuda_on_cpu.py``), the kernels in Triton's interpreter. On a GPU
the real platform's parts are checked by ``test_kernels.py`` and ``test_correctness.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sagellm.testing import BackendSuite

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
