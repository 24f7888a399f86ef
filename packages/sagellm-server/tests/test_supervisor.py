"""Engine supervision in a real server process with the scripted engine: a killed engine process
fails its requests cleanly and comes back; ``--on-engine-death exit`` and exhausted restarts make
the server exit non-zero; a hung engine is killed and replaced, a slow one is not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from fake_engine import CRAWL, HANG
from fake_server import non_empty, pid_exists, sse_error, sse_tokens, start_fake_server, wait_health
from server_harness import MODEL_NAME, descendants, engine_pid, serving


def test_killed_engine_fails_its_requests_and_is_restarted(tmp_path: Path) -> None:
    with serving(start_fake_server(tmp_path, "--engine-restart-backoff", "0.1")) as srv:
        pid = engine_pid(srv)
        body = {"prompt": [1, CRAWL], "max_tokens": 40, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                          timeout=60) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data: {"))
            os.kill(pid, signal.SIGKILL)
            err = sse_error(non_empty(lines))
        assert err["type"] == "server_error" and err["code"] == "engine_dead", err
        wait_health(srv, 200)
        assert httpx.head(f"{srv.url}/health", timeout=5).status_code == 200
        new = engine_pid(srv)
        assert new != pid and new in descendants(srv.proc.pid)
        assert not pid_exists(pid)  # reaped: no zombie left behind
        r2 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=30,
                        json={"prompt": [1, 2], "max_tokens": 3, "return_token_ids": True})
        assert r2.status_code == 200 and r2.json()["choices"][0]["token_ids"] == [2, 3, 4], r2.text
        m = httpx.get(f"{srv.url}/metrics", headers=srv.headers, timeout=10).text
        assert f'sagellm:engine_restarts_total{{model_name="{MODEL_NAME}"}} 1.0' in m
        assert f'sagellm:engine_alive{{model_name="{MODEL_NAME}"}} 1.0' in m
        assert "the engine process exited (killed by signal SIGKILL)" in srv.log_text()


def test_on_engine_death_exit_makes_the_server_exit_nonzero(tmp_path: Path) -> None:
    with serving(start_fake_server(tmp_path, "--on-engine-death", "exit"), returncodes=None) as srv:
        os.kill(engine_pid(srv), signal.SIGKILL)
        assert srv.proc.wait(30) == 1, srv.log_text()[-3000:]


def test_exhausted_restarts_make_the_server_exit_nonzero(tmp_path: Path) -> None:
    srv = start_fake_server(tmp_path, "--engine-restarts", "1", "--engine-restart-backoff", "0.1")
    with serving(srv, returncodes=None):
        first = engine_pid(srv)
        os.kill(first, signal.SIGKILL)
        wait_health(srv, 200)
        second = engine_pid(srv)
        assert second != first
        os.kill(second, signal.SIGKILL)  # a second death within the window: over the budget
        assert srv.proc.wait(30) == 1, srv.log_text()[-3000:]
        assert "giving up" in srv.log_text()
        assert not pid_exists(second)


def test_hung_engine_is_killed_and_replaced_but_a_slow_one_is_not(tmp_path: Path) -> None:
    srv = start_fake_server(tmp_path, "--engine-hang-timeout", "1", "--engine-restart-backoff", "0.1")
    with serving(srv):
        pid = engine_pid(srv)
        # 30 steps of 0.1 s: far longer than the timeout in all, but progressing all along.
        body = {"prompt": [1, CRAWL], "max_tokens": 30, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                          timeout=60) as r:
            lines = non_empty(r.iter_lines())
        assert lines[-1] == "data: [DONE]" and sse_tokens(lines) == list(range(2, 32))
        assert engine_pid(srv) == pid
        # A step that never returns: no progress for a second, so the engine is killed.
        r2 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=60,
                        json={"prompt": [HANG], "max_tokens": 2})
        assert r2.status_code == 500 and r2.json()["error"]["code"] == "engine_dead", r2.text
        assert "no progress" in r2.json()["error"]["message"]
        wait_health(srv, 200)
        assert engine_pid(srv) != pid and not pid_exists(pid)
        r3 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=30,
                        json={"prompt": [1], "max_tokens": 2})
        assert r3.status_code == 200, r3.text
