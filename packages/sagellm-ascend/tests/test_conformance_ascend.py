"""The Ascend backend passes the conformance suite: emulated on the CPU in CI, and on real NPUs
where torch_npu finds some (the ``ascend_hardware`` class skips itself elsewhere)."""

from __future__ import annotations

import pytest

from sagellm.testing import BackendSuite
from sagellm_ascend.platform import AscendPlatform


class TestAscendEmulated(BackendSuite):
    """Test-only: SAGELLM_ASCEND_EMULATE=cpu runs this package's logic against CPU models of the
    torch_npu ops. It says nothing about the real kernels."""

    platform_cls = AscendPlatform
    platform_env = {"SAGELLM_ASCEND_EMULATE": "cpu"}


@pytest.mark.ascend_hardware
class TestAscendHardware(BackendSuite):
    """Real NPUs: fused ops in float16, block size 128 as the kernels prefer, two NPUs for comm."""

    platform_cls = AscendPlatform
    platform_env = {"SAGELLM_ASCEND_EMULATE": ""}
    block_size = 128
    head_dim = 128
    two_rank_devices = (0, 1)
    e2e_match_tokens = 4
