"""A real ``sagellm-server`` process serving the scripted engine (token ids only; no model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from server_harness import Server, start_server


def start_fake_server(tmp: Path, *extra: str) -> Server:
    return start_server(tmp, "--engine-factory", "fake_engine:make_engine", "--max-num-seqs", "4", *extra)


def sse_tokens(lines: list[str]) -> list[int]:
    """Every token id of a stream's chunks (``return_token_ids``)."""
    return [t for ln in lines if ln.startswith("data: {")
            for ch in json.loads(ln[6:]).get("choices", []) for t in ch.get("token_ids", [])]


def sse_error(lines: list[str]) -> dict:
    """The error event that must come right before ``[DONE]``."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return json.loads(lines[-2][6:])["error"]  # type: ignore[no-any-return]


def non_empty(lines: Iterator[str]) -> list[str]:
    return [ln for ln in lines if ln]


def wait_health(srv: Server, status: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{srv.url}/health", timeout=5).status_code == status:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"/health never answered {status}:\n{srv.log_text()[-3000:]}"
        time.sleep(0.05)


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is in the process table at all (a zombie still is; a reaped process is not)."""
    return Path(f"/proc/{pid}").exists()
