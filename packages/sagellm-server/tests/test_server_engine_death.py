"""A real server (SmolLM2) whose engine process is killed: its requests fail cleanly, /health
answers 503 while it is down and 200 once the supervisor has started a new one, and the server
still shuts down cleanly."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
from fake_server import pid_exists, wait_health
from server_harness import MODEL_NAME, descendants, engine_pid, start_server, stop_server, wait_gone


def test_killed_engine_process_is_detected_replaced_and_the_server_still_exits_cleanly(tmp_path: Path) -> None:
    # A backoff long enough to see the engine down before the restart begins.
    srv = start_server(tmp_path, "--max-num-seqs", "4", "--engine-restart-backoff", "3")
    try:
        pid = engine_pid(srv)
        assert pid != srv.proc.pid and pid in descendants(srv.proc.pid)
        body = {"model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 2000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                          timeout=60) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data: {"))  # it is generating
            os.kill(pid, signal.SIGKILL)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["type"] == "server_error" and "SIGKILL" in err["message"], err
        h = httpx.get(f"{srv.url}/health", timeout=10)
        assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
        assert "SIGKILL" not in h.text  # public: down, not why
        r2 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=10,
                        json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
        assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
        m = httpx.get(f"{srv.url}/metrics", headers=srv.headers, timeout=10).text
        assert f'sagellm:engine_alive{{model_name="{MODEL_NAME}"}} 0.0' in m
        assert "sagellm:num_requests_running{" not in m  # a dead engine's load is not live
        wait_health(srv, 200, timeout=240)
        assert not pid_exists(pid) and engine_pid(srv) != pid
        r3 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=60,
                        json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
        assert r3.status_code == 200, r3.text
        m = httpx.get(f"{srv.url}/metrics", headers=srv.headers, timeout=10).text
        assert f'sagellm:engine_restarts_total{{model_name="{MODEL_NAME}"}} 1.0' in m
    finally:
        below = descendants(srv.proc.pid)
        t0 = time.monotonic()
        stop_server(srv)
    assert srv.proc.returncode == 0 and time.monotonic() - t0 < 15, srv.log_text()[-3000:]
    assert "Application shutdown complete" in srv.log_text()
    wait_gone(below, 10)
