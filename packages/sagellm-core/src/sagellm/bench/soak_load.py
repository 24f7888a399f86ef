"""One level of load: C closed-loop client threads for T seconds, tallied into a JSON-ready dict.

Each client sends its next request as soon as the previous one is over, and starts none after
``seconds``; a request still streaming ``drain`` seconds later is hung up on and counted as
``cut``. So a level ends by itself within ``seconds + drain + read_timeout``, whatever the
server does.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sagellm.bench import soak_client
from sagellm.bench.soak_client import Outcome
from sagellm.bench.soak_probe import Target
from sagellm.bench.soak_requests import BadRequest, Mix, bad_body, plan
from sagellm.bench.stats import summary

#: Error samples kept per level (the counts are complete).
MAX_SAMPLES = 20


@dataclass
class Tally:
    """Everything the client threads report, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: int = 0
    events: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    bad: dict[str, collections.Counter[str]] = field(default_factory=dict)
    bad_failures: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str, out: Outcome) -> None:
        with self.lock:
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
        with self.lock:
            self.bad.setdefault(kind, collections.Counter())[result] += 1
            if result != "4xx" and len(self.bad_failures) < MAX_SAMPLES:
                self.bad_failures.append({"kind": kind, "result": result, "detail": detail[:300]})

    def as_dict(self, wall_s: float, cpu_s: float) -> dict[str, Any]:
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
            # The client's own cost: CPU seconds of this process over wall seconds (one core is
            # 1.0; near it, with the GIL, the client would be what limits the level).
            "client": {"cpu_s": cpu_s, "cpu_fraction": cpu_s / wall_s if wall_s else 0.0,
                       "sse_events": self.events,
                       "us_per_event": cpu_s * 1e6 / self.events if self.events else None},
        }


def run_level(target: Target, mix: Mix, bad: list[BadRequest], clients: int, seconds: float,
              drain: float, read_timeout: float, first_index: int = 0, first_bad: int = 0
              ) -> dict[str, Any]:
    """Run ``clients`` closed-loop clients for ``seconds``.

    Request numbers start at ``first_index`` and hostile requests at ``first_bad`` (both are
    returned as ``next_index``/``next_bad``), so levels continue the same sequence and every
    hostile kind is sent even when each level sends only a few.
    """
    tally = Tally()
    counter = {"next": first_index, "bad": first_bad}
    counter_lock = threading.Lock()
    t0 = time.monotonic()
    deadline, hard_deadline = t0 + seconds, t0 + seconds + drain

    def client() -> None:
        while time.monotonic() < deadline:
            with counter_lock:
                i = counter["next"]
                counter["next"] += 1
            req = plan(mix, i)
            if req is not None:
                tally.add(req.path, soak_client.stream(target, req, hard_deadline, read_timeout))
                continue
            if not bad:
                continue
            with counter_lock:
                n = counter["bad"]
                counter["bad"] += 1
            b = bad[n % len(bad)]
            result, detail = soak_client.send_bad(target, b, bad_body(b, n // len(bad)), read_timeout)
            tally.add_bad(b.kind, result, detail)

    cpu0 = time.process_time()
    threads = [threading.Thread(target=client, name=f"soak-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = tally.as_dict(time.monotonic() - t0, time.process_time() - cpu0)
    out.update(clients=clients, seconds=seconds, next_index=counter["next"], next_bad=counter["bad"])
    return out
