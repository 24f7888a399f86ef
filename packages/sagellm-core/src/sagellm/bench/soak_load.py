"""One level of load: C closed-loop client threads for T seconds, tallied into a JSON-ready dict.

Each client sends its next request as soon as the previous one is over, and starts none after
``seconds``; a request still streaming ``drain`` seconds later is hung up on and counted as
``cut``. So a level ends by itself within ``seconds + drain + read_timeout``, whatever the
server does.

The clients may be spread over ``procs`` processes (threads in each): one Python process reads
some 25,000 SSE events/s on one core (about 40 us of CPU each, mostly the ``recv``), and a
256-stream level on a fast GPU produces about that many, so a single process could become what
limits the level. Each process reports its CPU time; ``client.cpu_fraction_max`` near 1.0 means
the client was the bottleneck.
"""

from __future__ import annotations

import collections
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sagellm.bench import soak_client
from sagellm.bench.soak_client import Outcome
from sagellm.bench.soak_probe import Target
from sagellm.bench.soak_requests import BadRequest, Mix, bad_body, plan
from sagellm.bench.stats import summary

#: Error samples kept per level (the counts are complete).
MAX_SAMPLES = 20
#: Pause of a client after a failed request: against a dead engine every request fails at once,
#: and without it the clients would only measure how fast the server can say 503.
ERROR_BACKOFF_S = 0.1


@dataclass
class Tally:
    """Everything the client threads of one process report (merged across processes)."""

    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: int = 0
    events: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    bad: dict[str, collections.Counter[str]] = field(default_factory=dict)
    bad_failures: list[dict[str, str]] = field(default_factory=list)
    #: Per process: (monotonic start, monotonic end, CPU seconds); requests numbered so far.
    spans: list[tuple[float, float, float]] = field(default_factory=list)
    num_sent: int = 0
    num_bad_sent: int = 0

    def add(self, path: str, out: Outcome) -> None:
        self.kinds[out.kind] += 1
        self.tokens += out.tokens
        self.events += out.events
        if out.is_error and len(self.errors) < MAX_SAMPLES:
            self.errors.append({"kind": out.kind, "path": path, "detail": out.detail[:300]})
        if out.kind != "ok":
            return
        if out.first is not None:
            self.ttft_ms.append((out.first - out.start) * 1e3)
            if out.tokens > 1:
                self.tpot_ms.append((out.end - out.first) * 1e3 / (out.tokens - 1))
        self.e2e_ms.append((out.end - out.start) * 1e3)

    def add_bad(self, kind: str, result: str, detail: str) -> None:
        self.bad.setdefault(kind, collections.Counter())[result] += 1
        if result != "4xx" and len(self.bad_failures) < MAX_SAMPLES:
            self.bad_failures.append({"kind": kind, "result": result, "detail": detail[:300]})

    def merge(self, other: Tally) -> None:
        self.kinds.update(other.kinds)
        self.tokens += other.tokens
        self.events += other.events
        for name in ("ttft_ms", "e2e_ms", "tpot_ms", "spans"):
            getattr(self, name).extend(getattr(other, name))
        self.errors.extend(other.errors[:MAX_SAMPLES - len(self.errors)])
        self.bad_failures.extend(other.bad_failures[:MAX_SAMPLES - len(self.bad_failures)])
        for kind, c in other.bad.items():
            self.bad.setdefault(kind, collections.Counter()).update(c)
        self.num_sent = max(self.num_sent, other.num_sent)
        self.num_bad_sent = max(self.num_bad_sent, other.num_bad_sent)

    def as_dict(self) -> dict[str, Any]:
        wall_s = max(e for _, e, _ in self.spans) - min(s for s, _, _ in self.spans)
        cpu_s = sum(c for _, _, c in self.spans)
        stayed_errors = sum(n for k, n in self.kinds.items() if k not in ("ok", "disconnected"))
        bad_sent = sum(sum(c.values()) for c in self.bad.values())
        bad_4xx = sum(c["4xx"] for c in self.bad.values())
        return {
            "wall_s": wall_s,
            "requests": sum(self.kinds.values()) + bad_sent,
            "completed": self.kinds["ok"],
            "disconnected": self.kinds["disconnected"],
            "outcomes": dict(self.kinds),
            "client_errors": stayed_errors,
            "error_samples": self.errors,
            "generated_tokens": self.tokens,
            "out_tok_s": self.tokens / wall_s if wall_s else 0.0,
            "ttft_ms": summary(self.ttft_ms), "tpot_ms": summary(self.tpot_ms),
            "e2e_ms": summary(self.e2e_ms),
            "bad_requests": {"sent": bad_sent, "answered_4xx": bad_4xx, "not_4xx": bad_sent - bad_4xx,
                             "by_kind": {k: dict(c) for k, c in sorted(self.bad.items())},
                             "failure_samples": self.bad_failures},
            "client": {"procs": len(self.spans), "cpu_s": cpu_s,
                       "cpu_fraction_max": max(c / (e - s) for s, e, c in self.spans if e > s),
                       "sse_events": self.events,
                       "us_per_event": cpu_s * 1e6 / self.events if self.events else None},
        }


@dataclass(frozen=True)
class Job:
    """What one client process runs; request numbers ``first + k * stride`` for k = 0, 1, ..."""

    target: Target
    mix: Mix
    bad: list[BadRequest]
    clients: int
    seconds: float
    drain: float
    read_timeout: float
    first_index: int
    first_bad: int
    stride: int = 1


def run_threads(job: Job) -> Tally:
    """``job.clients`` client threads in this process until the level's time is up."""
    tally, lock = Tally(), threading.Lock()
    counts = [0, 0]  # requests, hostile requests numbered by this process
    t0 = time.monotonic()
    deadline, hard_deadline = t0 + job.seconds, t0 + job.seconds + job.drain

    def number(k: int) -> int:
        with lock:
            n = counts[k]
            counts[k] += 1
        return n

    def client() -> None:
        while time.monotonic() < deadline:
            req = plan(job.mix, job.first_index + number(0) * job.stride)
            if req is not None:
                out = soak_client.stream(job.target, req, hard_deadline, job.read_timeout)
                with lock:
                    tally.add(req.path, out)
                if out.is_error:
                    time.sleep(ERROR_BACKOFF_S)
            elif job.bad:
                n = job.first_bad + number(1) * job.stride
                b = job.bad[n % len(job.bad)]
                result, detail = soak_client.send_bad(job.target, b, bad_body(b, n // len(job.bad)),
                                                      job.read_timeout)
                with lock:
                    tally.add_bad(b.kind, result, detail)
                if result != "4xx":
                    time.sleep(ERROR_BACKOFF_S)

    cpu0 = time.process_time()
    threads = [threading.Thread(target=client, name=f"soak-{k}", daemon=True) for k in range(job.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.spans.append((t0, time.monotonic(), time.process_time() - cpu0))
    tally.num_sent, tally.num_bad_sent = counts
    return tally


def run_level(job: Job, procs: int = 1) -> dict[str, Any]:
    """Run ``job`` over ``procs`` processes (1: in this one); returns the level's tally."""
    procs = max(1, min(procs, job.clients))
    if procs == 1:
        tally = run_threads(job)
    else:
        # spawn, not fork: the parent may hold threads and locks (logging, a server in tests).
        ctx = multiprocessing.get_context("spawn")
        shares = [job.clients // procs + (p < job.clients % procs) for p in range(procs)]
        jobs = [Job(job.target, job.mix, job.bad, n, job.seconds, job.drain, job.read_timeout,
                    job.first_index + p, job.first_bad + p, procs) for p, n in enumerate(shares)]
        with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            tallies = list(pool.map(run_threads, jobs))
        tally = tallies[0]
        for t in tallies[1:]:
            tally.merge(t)
    out = tally.as_dict()
    stride = max(1, procs)
    out.update(clients=job.clients, seconds=job.seconds,
               next_index=job.first_index + tally.num_sent * stride,
               next_bad=job.first_bad + tally.num_bad_sent * stride)
    return out
