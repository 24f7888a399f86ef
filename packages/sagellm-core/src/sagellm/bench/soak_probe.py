"""What the soak reads from the server between levels: ``/metrics``, ``/v1/models``, idleness.

Standard library only. Samples of one metric name are summed over their label sets: the server
labels everything with ``model_name`` alone today, and a per-worker RSS gauge (tensor parallel)
is meant to be summed anyway.

KV leak: ``sagellm:num_free_kv_blocks`` is ``BlockManager.num_free_blocks``, which counts the
prefix cache's evictable blocks (held by no request, content kept for reuse) as free, since any
allocation may take them. So on an idle server ``num_kv_blocks - num_free_kv_blocks`` is exactly
the blocks still referenced by some request, i.e. the leak. Should a server export the cached
blocks separately and leave them out of the free figure, :func:`kv_leak` adds them back.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

RESTARTS = ("sagellm:engine_restarts_total", "sagellm:engine_restarts")


def parse_prometheus(text: str) -> dict[str, float]:
    """``name -> value`` summed over label sets; comments and unparsable lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def kv_leak(m: dict[str, float]) -> float | None:
    """Blocks still held by some request (meaningful on an idle server); None if unknown."""
    if "sagellm:num_kv_blocks" not in m or "sagellm:num_free_kv_blocks" not in m:
        return None
    return m["sagellm:num_kv_blocks"] - m["sagellm:num_free_kv_blocks"]


def restarts(m: dict[str, float]) -> float | None:
    return next((m[k] for k in RESTARTS if k in m), None)


def growth(before: float | None, after: float | None) -> float | None:
    """Relative growth ``after / before - 1``; None when either is unknown."""
    if before is None or after is None or before <= 0 or math.isnan(before) or math.isnan(after):
        return None
    return after / before - 1


@dataclass
class Target:
    """The server under test. Only loopback hosts unless ``allow_remote`` (see ``soak.py``)."""

    host: str
    port: int
    api_key: str | None = None

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None) -> Target:
        u = urlparse(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"the soak needs an http://host:port URL, not {url!r}")
        return cls(u.hostname, u.port or 80, api_key)

    @property
    def is_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    def headers(self, json_body: bool = False) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if json_body:
            h["Content-Type"] = "application/json"
        return h

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=self.headers())
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """The current ``/metrics``; empty when the server does not answer (counted as unknown)."""
        try:
            status, body = self.get("/metrics")
        except (OSError, http.client.HTTPException):
            return {}
        return parse_prometheus(body.decode(errors="replace")) if status == 200 else {}

    def model_info(self) -> dict[str, Any]:
        """The first entry of ``/v1/models`` (``id``, ``max_model_len``), or ``{}``."""
        try:
            status, body = self.get("/v1/models")
            data = json.loads(body).get("data") or [] if status == 200 else []
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return {}
        return data[0] if data and isinstance(data[0], dict) else {}

    def wait_idle(self, timeout: float, settle: float = 5.0) -> tuple[dict[str, float], bool]:
        """Metrics once nothing runs or waits, and the KV figure has settled (or ``settle`` s).

        The engine publishes its stats once per step, so the first idle snapshot can predate the
        freeing of the last aborted request's blocks; a real leak stays, so waiting a few seconds
        for it to reach 0 only removes that race. Returns (metrics, whether it went idle); a dead
        engine never does, so that returns at once.
        """
        deadline = time.monotonic() + timeout
        m = self.metrics()
        while time.monotonic() < deadline:
            if m.get("sagellm:engine_alive") == 0:
                return m, False
            if m and m.get("sagellm:num_requests_running", 1) == 0 \
                    and m.get("sagellm:num_requests_waiting", 1) == 0:
                settle_end = min(deadline, time.monotonic() + settle)
                while (kv_leak(m) or 0) > 0 and time.monotonic() < settle_end:
                    time.sleep(0.25)
                    m = self.metrics() or m
                return m, True
            time.sleep(0.25)
            m = self.metrics()
        return m, False
