"""The MLU backend passes the conformance suite: emulated on the CPU in CI, and on real MLUs
where torch_mlu finds some (the ``mlu_hardware`` class skips itself elsewhere)."""

from __future__ import annotations

import pytest

from sagellm.testing import BackendSuite
from sagellm_mlu.platform import MluPlatform


class TestMluEmulated(BackendSuite):
    """Test-only: SAGELLM_MLU_EMULATE=cpu runs this package's logic against CPU models of the
    torch_mlu_ops functions. It says nothing about the real kernels."""

    platform_cls = MluPlatform
    platform_env = {"SAGELLM_MLU_EMULATE": "cpu"}


@pytest.mark.mlu_hardware
class TestMluHardware(BackendSuite):
    """Real MLUs: float16, block size 16 (torch_mlu_ops takes 1..64), two MLUs for comm."""

    platform_cls = MluPlatform
    platform_env = {"SAGELLM_MLU_EMULATE": ""}
    block_size = 16
    head_dim = 128
    two_rank_devices = (0, 1)
    e2e_match_tokens = 4
