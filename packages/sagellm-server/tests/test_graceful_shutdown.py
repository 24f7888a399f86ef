"""SIGTERM on a real server (``sagellm_server.server``): what is in flight finishes within
``--shutdown-timeout`` (a whole stream, with ``[DONE]``), what would outlast it is ended with an
error, nothing new is admitted meanwhile, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from fake_engine import CRAWL
from fake_server import non_empty, sse_error, sse_tokens, start_fake_server
from server_harness import Server, descendants, stop_server, wait_gone


def _refused_or_shutting_down(srv: Server, timeout: float = 10.0) -> str:
    """Post until the server turns new work away (it has handled the signal): how it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=5,
                           json={"prompt": [1], "max_tokens": 1})
        except httpx.TransportError:
            return "refused"
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down", r.text
            return "503"
        time.sleep(0.05)
    raise AssertionError("the server kept admitting requests after SIGTERM")


def test_sigterm_lets_a_stream_finish_within_the_timeout(tmp_path: Path) -> None:
    srv = start_fake_server(tmp_path, "--shutdown-timeout", "60")
    try:
        below = descendants(srv.proc.pid)
        body = {"prompt": [1, CRAWL], "max_tokens": 30, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                          timeout=60) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: {"))
            srv.proc.send_signal(signal.SIGTERM)
            _refused_or_shutting_down(srv)
            rest = non_empty(lines)
        assert rest[-1] == "data: [DONE]"
        assert sse_tokens([first, *rest]) == list(range(2, 32))  # every token, nothing cut
        assert srv.proc.wait(30) == 0, srv.log_text()[-3000:]
        wait_gone(below, 10)
    finally:
        stop_server(srv)


def test_sigterm_ends_what_outlasts_the_timeout_with_an_error(tmp_path: Path) -> None:
    srv = start_fake_server(tmp_path, "--shutdown-timeout", "0.5")
    try:
        plain: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: plain.append(httpx.post(
            f"{srv.url}/v1/completions", headers=srv.headers, timeout=60,
            json={"prompt": [2, CRAWL], "max_tokens": 60})))
        body = {"prompt": [1, CRAWL], "max_tokens": 60, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                          timeout=60) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: {"))
            worker.start()
            deadline = time.monotonic() + 10
            while "num_requests_running{" not in _running(srv, 2) and time.monotonic() < deadline:
                time.sleep(0.02)  # both requests are in the engine
            srv.proc.send_signal(signal.SIGTERM)
            rest = non_empty(lines)
        err = sse_error(rest)
        assert err["code"] == "shutting_down", err
        assert len(sse_tokens([first, *rest])) < 60  # ended, not finished
        worker.join(30)
        assert plain and plain[0].status_code == 503, plain
        assert plain[0].json()["error"]["code"] == "shutting_down"
        assert srv.proc.wait(30) == 0, srv.log_text()[-3000:]
        assert "ended 2 requests still in flight" in srv.log_text()
    finally:
        stop_server(srv)


def _running(srv: Server, n: int) -> str:
    """The running-requests gauge line if it reads ``n``, else ''."""
    m = httpx.get(f"{srv.url}/metrics", headers=srv.headers, timeout=5).text
    return next((ln for ln in m.splitlines()
                 if ln.startswith("sagellm:num_requests_running{") and ln.endswith(f" {n}.0")), "")
