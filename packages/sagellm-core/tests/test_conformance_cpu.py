"""The built-in CPU backend passes the conformance suite every backend runs."""

from __future__ import annotations

from sagellm.backends.cpu import CpuPlatform
from sagellm.testing import BackendSuite


class TestCpu(BackendSuite):
    platform_cls = CpuPlatform
