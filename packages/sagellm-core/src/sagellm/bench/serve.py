"""serve_c1 / serve_c16: closed-loop streaming clients against an OpenAI ``/v1/completions``.

Standard library only (threads and ``http.client``), so the client needs nothing the server
does not. Each client sends its next request as soon as the previous one finished. Prompts are
512 random token ids (seed 7000 + request index), ``max_tokens`` 256, ``ignore_eos``, greedy,
``stream: true``; ``return_token_ids`` lets the client count tokens per chunk exactly.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

from sagellm.bench.stats import summary as _summary
from sagellm.bench.workloads import random_prompt


def one_request(url: str, prompt: list[int], max_tokens: int, model: str | None = None
                ) -> dict[str, Any]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
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
    one_request(url, random_prompt(6999, 16), 8)  # warm
    lock = threading.Lock()
    next_idx = [0]
    results: list[dict[str, Any]] = []
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                i = next_idx[0]
                if i >= num_requests:
                    return
                next_idx[0] += 1
            try:
                r = one_request(url, random_prompt(7000 + i, prompt_len), max_tokens)
                with lock:
                    results.append(r)
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
        if n > 1:
            tpot.append((r["times"][-1] - r["times"][0]) * 1e3 / (n - r["counts"][0]))
        for a, b, c in zip(r["times"], r["times"][1:], r["counts"][1:]):
            itl.extend([(b - a) * 1e3 / c] * c)
    return {"url": url, "num": num_requests, "concurrency": concurrency, "input_len": prompt_len,
            "output_len": max_tokens, "duration_s": duration, "completed": len(results),
            "n_errors": len(errors), "errors": errors[:5], "out_tok_s": total / duration,
            "req_s": len(results) / duration, "ttft_ms": _summary(ttft), "tpot_ms": _summary(tpot),
            "itl_ms": _summary(itl), "e2e_ms": _summary(e2e)}
