from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mlu_hardware: needs Cambricon MLUs and torch_mlu (skipped without)")
