"""The server with asynchronous scheduling forced on (the CPU backend's default is off; CUDA's
is on): the same streams, disconnects, hostile requests and constrained outputs as
``test_server.py``, against a server whose engine queues each step before it waits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_harness import Server, serving, start_server  # noqa: E402
from test_server import (  # noqa: E402,F401 - collected again here, against this server
    offline_greedy,
    test_32_concurrent_streams_match_offline_greedy,
    test_bad_request,
    test_chat_logprobs_are_the_models_own,
    test_chat_stop_and_seed,
    test_disconnect_mid_stream_frees_kv_blocks,
    test_disconnect_non_streaming_aborts,
    test_regex_and_choice_constrain_the_real_model,
    test_server_answers_normally_after_bad_requests,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(start_server(tmp_path_factory.mktemp("server-async"), "--max-num-seqs", "32",
                              "--max-queued-requests", "4", "--async-scheduling")) as srv:
        yield srv
    log = srv.log_text()
    assert "Application shutdown complete" in log
    assert "tokens, asynchronous scheduling" in log  # the engine's ready line
    assert "runs each step synchronously" not in log and "queueing step" not in log
