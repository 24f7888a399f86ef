"""A real server whose engine process dies: noticed at once, reported, and shut down cleanly."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
from server_harness import MODEL_NAME, descendants, engine_pid, start_server, stop_server, wait_gone


def test_killed_engine_process_is_detected_and_the_server_still_exits_cleanly(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-num-seqs", "4")
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
        r2 = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=10,
                        json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
        assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
        m = httpx.get(f"{srv.url}/metrics", headers=srv.headers, timeout=10).text
        assert f'sagellm:engine_alive{{model_name="{MODEL_NAME}"}} 0.0' in m
    finally:
        below = descendants(srv.proc.pid)
        t0 = time.monotonic()
        stop_server(srv)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit status -15.
    assert srv.proc.returncode in (0, -signal.SIGTERM) and time.monotonic() - t0 < 10, srv.log_text()[-3000:]
    assert "Application shutdown complete" in srv.log_text()
    wait_gone(below, 10)
