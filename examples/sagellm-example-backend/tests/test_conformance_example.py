"""The whole conformance suite, in one line."""

from __future__ import annotations

from sagellm.testing import BackendSuite
from sagellm_example_backend.platform import ExamplePlatform


class TestExample(BackendSuite):
    platform_cls = ExamplePlatform
