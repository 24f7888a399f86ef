"""A real ``sagellm-server`` process on a free port, shared by a test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The root config uses --import-mode=importlib, which does not put test directories on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from server_harness import Server, descendants, start_server, stop_server, wait_gone  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"), "--max-num-seqs", "32",
                       "--max-queued-requests", "4")
    try:
        yield srv
    finally:
        below = descendants(srv.proc.pid)  # the engine process (and multiprocessing's helpers)
        stop_server(srv)
        # SIGTERM: a graceful drain, then exit status 0.
        assert srv.proc.returncode == 0, srv.log_text()[-3000:]
        assert "Application shutdown complete" in srv.log_text()
        wait_gone(below, 10)  # no orphans
