"""A real ``sagellm-server`` process on a free port, shared by a test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The root config uses --import-mode=importlib, which does not put test directories on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
import core_standins  # noqa: E402,F401  # before any sagellm_server module is imported
from server_harness import Server, serving, start_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # SIGTERM at the end: a graceful drain, then exit status 0 and no orphans.
    with serving(start_server(tmp_path_factory.mktemp("server"), "--max-num-seqs", "32",
                              "--max-queued-requests", "4")) as srv:
        yield srv
    assert "Application shutdown complete" in srv.log_text()
