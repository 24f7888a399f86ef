"""The serve workloads: closed-loop streaming clients against an OpenAI ``/v1/completions``.

Standard library only (threads and ``http.client``), so the client needs nothing the server
does not. Each client sends its next request as soon as the previous one finished; every request
is greedy, ``ignore_eos``, ``stream: true``, and ``return_token_ids`` lets the client count tokens
per chunk exactly. The workloads (``../shared/bench/README.md``) are :data:`WORKLOADS`:

- ``serve_c1`` / ``serve_c16`` / ``serve_c64``: 1 / 16 / 64 clients, 8 / 64 / 256 requests,
  prompts of 512 random token ids (seed 7000 + request index), ``max_tokens`` 256;
- ``serve_mixed``: 32 clients, 256 requests, prompt lengths ``default_rng(8000).integers(256,
  2049, 256)`` with the ids drawn after them from the same generator, output lengths
  ``default_rng(8007).integers(32, 513, 256)``: many prefills of different sizes arriving while
  others decode.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sagellm.bench.stats import summary as _summary
from sagellm.bench.workloads import random_prompt

Requests = tuple[list[list[int]], list[int]]


def fixed(num: int, prompt_len: int = 512, max_tokens: int = 256) -> Callable[[], Requests]:
    """``num`` prompts of ``prompt_len`` random ids (seed 7000 + index), ``max_tokens`` each."""
    return lambda: ([random_prompt(7000 + i, prompt_len) for i in range(num)], [max_tokens] * num)


def mixed(num: int = 256) -> Requests:
    """serve_mixed's requests: lengths and ids from seed 8000, output lengths from seed 8007."""
    import numpy as np

    rng = np.random.default_rng(8000)
    lens = rng.integers(256, 2049, num)
    prompts = [rng.integers(100, 49000, size=int(n)).tolist() for n in lens]
    outs = np.random.default_rng(8007).integers(32, 513, num)
    return prompts, [int(m) for m in outs]


@dataclass(frozen=True)
class ServeWorkload:
    concurrency: int
    requests: Callable[[], Requests]


WORKLOADS: dict[str, ServeWorkload] = {
    "serve_c1": ServeWorkload(1, fixed(8)),
    "serve_c16": ServeWorkload(16, fixed(64)),
    "serve_c64": ServeWorkload(64, fixed(256)),
    "serve_mixed": ServeWorkload(32, mixed),
}


def run_workload(url: str, name: str, extra: dict[str, Any] | None = None,
                 max_tokens: list[int] | None = None) -> dict[str, Any]:
    """One serve workload; ``max_tokens`` (one per request) replaces the workload's output
    lengths: given another run's ``out_lens``, plain requests do the same work as that run's
    (a grammar ends requests early, so a constrained run would otherwise decode fewer tokens
    per prompt than its plain base, and the two would not compare like for like)."""
    w = WORKLOADS[name]
    prompts, lens = w.requests()
    if max_tokens is not None:
        if len(max_tokens) != len(prompts) or any(
                not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in max_tokens):
            raise ValueError(f"{name} needs {len(prompts)} output lengths of at least 1, one per "
                             f"request; got {len(max_tokens)}")
        lens = max_tokens
    out = run_requests(url, w.concurrency, prompts, lens, extra)
    out["workload"] = name
    if extra:
        out["extra_body"] = extra
    if max_tokens is not None:
        out["matched_lengths"] = True
    return out


def matched_lengths(path: Path, name: str) -> list[int]:
    """The per-request output lengths (``out_lens``) of workload ``name`` in the result file
    ``path``; a failed request (length 0) keeps the workload's own length."""
    row = json.loads(path.read_text()).get(name)
    if not isinstance(row, dict) or not isinstance(row.get("out_lens"), list):
        raise ValueError(f"{path} has no {name} row with out_lens")
    default = WORKLOADS[name].requests()[1]
    lens = row["out_lens"]
    if len(lens) != len(default):
        raise ValueError(f"{path}: {name} has {len(lens)} out_lens, the workload {len(default)}")
    return [int(n) if n else d for n, d in zip(lens, default, strict=True)]


def one_request(url: str, prompt: list[int], max_tokens: int, model: str | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streaming completion; ``extra`` fields join the body (``response_format``,
    ``logprobs``, penalties: the cost of a feature is the same workload with it on)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **(extra or {})}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times: list[float] = []
    counts: list[int] = []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        if not choices:
            continue
        ids = choices[0].get("token_ids")
        n = len(ids) if ids is not None else (1 if choices[0].get("text") else 0)
        if n:
            times.append(time.perf_counter())
            counts.append(n)
    conn.close()
    end = time.perf_counter()
    return {"start": t0, "end": end, "times": times, "counts": counts}


def run_serve(url: str, concurrency: int, num_requests: int, prompt_len: int = 512,
              max_tokens: int = 256) -> dict[str, Any]:
    """``num_requests`` fixed-size requests from ``concurrency`` closed-loop clients."""
    prompts, outs = fixed(num_requests, prompt_len, max_tokens)()
    return run_requests(url, concurrency, prompts, outs)


def run_requests(url: str, concurrency: int, prompts: list[list[int]], max_tokens: list[int],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send ``prompts`` (request i asks ``max_tokens[i]``, with ``extra`` body fields) from
    ``concurrency`` closed-loop clients, in index order; one small warm-up request first."""
    num_requests = len(prompts)
    one_request(url, random_prompt(6999, 16), 8, extra=extra)  # warm (and compile a grammar)
    lock = threading.Lock()
    next_idx = [0]
    results: list[dict[str, Any]] = []
    out_lens = [0] * num_requests
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                i = next_idx[0]
                if i >= num_requests:
                    return
                next_idx[0] += 1
            try:
                r = one_request(url, prompts[i], max_tokens[i], extra=extra)
                with lock:
                    results.append(r)
                    out_lens[i] = sum(r["counts"])
            except Exception as exc:  # recorded, not fatal: the row reports errors
                with lock:
                    errors.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - t0
    ttft, tpot, itl, e2e = [], [], [], []
    total = 0
    for r in results:
        n = sum(r["counts"])
        total += n
        if not r["times"]:
            continue
        ttft.append((r["times"][0] - r["start"]) * 1e3)
        e2e.append((r["end"] - r["start"]) * 1e3)
        if n > r["counts"][0]:  # a token arrived after the first chunk
            tpot.append((r["times"][-1] - r["times"][0]) * 1e3 / (n - r["counts"][0]))
        for a, b, c in zip(r["times"], r["times"][1:], r["counts"][1:]):
            itl.extend([(b - a) * 1e3 / c] * c)
    lens = sorted({len(p) for p in prompts})
    outs = sorted(set(max_tokens))
    return {"url": url, "num": num_requests, "concurrency": concurrency,
            "input_len": lens[0] if len(lens) == 1 else [lens[0], lens[-1]],
            "output_len": outs[0] if len(outs) == 1 else [outs[0], outs[-1]],
            "requested_tokens": sum(max_tokens), "duration_s": duration, "completed": len(results),
            "n_errors": len(errors), "errors": errors[:5], "out_tok_s": total / duration,
            "req_s": len(results) / duration, "ttft_ms": _summary(ttft), "tpot_ms": _summary(tpot),
            "itl_ms": _summary(itl), "e2e_ms": _summary(e2e), "out_tokens": total,
            "out_lens": out_lens}
