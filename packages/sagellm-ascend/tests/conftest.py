from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ascend_hardware: needs Ascend NPUs and torch_npu (skipped without)")
