"""Prometheus metrics, all named ``sagellm:...``.

Engine-wide numbers (running and waiting requests, KV usage, token counters) are read from the
engine loop's latest stats snapshot when Prometheus scrapes, so they cost nothing per step.
While the engine is down its load gauges are absent (a dead engine's last numbers are not live)
and ``sagellm:engine_alive`` is 0; its counters carry on across a restart. Resident memory of the
server and of the engine process is read from ``/proc`` at scrape time. Per-request latencies are
histograms observed on the event loop as outputs arrive.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sagellm_server.async_engine import EngineSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` from ``/proc/PID/statm``; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class _EngineCollector(Collector):
    """Gauges and counters computed from the engine loop's snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], engine_pid: Callable[[], int | None],
                 model_name: str) -> None:
        self._snapshot = snapshot
        self._engine_pid = engine_pid
        self._labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if s.alive:  # a dead engine has no load; its last numbers would read as live
            yield self._gauge("sagellm:num_requests_running", "Requests in the running batch.", s.num_running)
            yield self._gauge("sagellm:num_requests_waiting", "Requests waiting to be scheduled.",
                              s.num_waiting)
            yield self._gauge("sagellm:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).",
                              s.kv_usage)
            yield self._gauge("sagellm:num_kv_blocks", "KV blocks in the pool.", s.num_kv_blocks)
            yield self._gauge("sagellm:num_free_kv_blocks", "KV blocks free in the pool.",
                              s.num_free_kv_blocks)
        yield self._gauge("sagellm:engine_alive", "1 while the engine runs, 0 while it is down.",
                          1.0 if s.alive else 0.0)
        server_rss = rss_bytes()
        if server_rss is not None:
            yield self._gauge("sagellm:server_rss_bytes", "Resident memory of the server process.",
                              server_rss)
        pid = self._engine_pid()
        engine_rss = rss_bytes(pid) if pid is not None else None
        if engine_rss is not None:
            yield self._gauge("sagellm:engine_rss_bytes", "Resident memory of the engine process "
                              "(absent while it is down, and with --engine-in-process).", engine_rss)
        yield self._counter("sagellm:prompt_tokens", "Prompt tokens prefilled.", s.num_prompt_tokens)
        yield self._counter("sagellm:generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield self._counter("sagellm:num_preemptions", "Sequences preempted for lack of KV blocks.",
                            s.num_preemptions)
        yield self._counter("sagellm:engine_steps", "Engine steps executed.", s.num_steps)
        yield self._counter("sagellm:prefix_cache_queries", "Prompt tokens looked up in the "
                            "prefix cache.", s.num_prefix_cache_queries)
        yield self._counter("sagellm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            s.num_prefix_cache_hits)
        yield self._counter("sagellm:kv_evictions", "Cached KV blocks evicted to make room.",
                            s.num_kv_evictions)


class ServerMetrics:
    """Everything ``GET /metrics`` exposes, in a registry of its own."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("sagellm:time_to_first_token_seconds",
                              "From request arrival to its first generated token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("sagellm:inter_token_latency_seconds",
                             "Between consecutive generated tokens of one request.", labels,
                             buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("sagellm:e2e_request_latency_seconds",
                             "From request arrival to its last token.", labels,
                             buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self._success = Counter("sagellm:request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._finished = {reason: self._success.labels(model_name, reason)
                          for reason in ("stop", "length", "abort")}
        self.rejected = Counter("sagellm:request_rejected", "Requests refused before reaching the "
                                "engine, by HTTP status.", ["model_name", "status"], registry=r)
        self.engine_restarts = Counter("sagellm:engine_restarts", "Times a dead engine was replaced "
                                       "by a new one that came up.", labels, registry=r).labels(model_name)

    def attach(self, snapshot: Callable[[], EngineSnapshot],
               engine_pid: Callable[[], int | None] = lambda: None) -> None:
        self.registry.register(_EngineCollector(snapshot, engine_pid, self.model_name))

    def finished(self, reason: str | None) -> None:
        counter = self._finished.get(reason or "abort")
        if counter is None:
            counter = self._finished[reason or "abort"] = self._success.labels(self.model_name, reason)
        counter.inc()

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
