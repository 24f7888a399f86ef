"""Serving overhead: the HTTP server versus the offline engine, same model, prompts and settings.

For each concurrency level C, C requests (greedy, ``ignore_eos``, ``--max-tokens`` each) start
together; we report mean TPOT (time per output token after the first, per request) and output
tokens/s (all tokens over the wall time). The offline run drives ``LLMEngine.step()`` directly
in this process; the server run starts ``sagellm-server`` on a free port and streams with raw
httpx (one SSE event per token). Offline and server runs alternate (never overlap), so load from
elsewhere on the machine hits both alike; each is reported as the best of ``--repeats``.

The offline engine is stepped from one worker thread, as the server's engine loop is: on a
loaded machine torch's OpenMP intra-op pool behaves very differently in the main thread (on our
2-core VM a 2-thread main-thread matmul was up to 50x slower than the same in a worker thread),
which would measure threading, not serving. ``--offline-main-thread`` shows that number too.

    python packages/sagellm-server/benchmarks/bench_overhead.py [--concurrency 1 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass
class Result:
    mode: str
    concurrency: int
    tpot_ms: float
    ttft_ms: float
    tokens_per_s: float
    num_tokens: int


def prompts(n: int) -> list[str]:
    return [f"Write a short story about robot number {i} who learns to paint." for i in range(n)]


class Offline:
    def __init__(self, max_num_seqs: int, main_thread: bool = False) -> None:
        from sagellm.config import EngineConfig
        from sagellm.engine.llm_engine import LLMEngine
        from sagellm.sampling_params import SamplingParams

        self.engine = LLMEngine(EngineConfig(max_num_seqs=max_num_seqs))
        self.params = SamplingParams
        self.pool = None if main_thread else ThreadPoolExecutor(1, thread_name_prefix="offline-engine")
        self.run(["warm up"], 4)

    def run(self, batch: list[str], max_tokens: int) -> Result:
        if self.pool is None:
            return self._run(batch, max_tokens)
        return self.pool.submit(self._run, batch, max_tokens).result()

    def _run(self, batch: list[str], max_tokens: int) -> Result:
        engine = self.engine
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.monotonic()
        ids = [engine.add_request(p, params) for p in batch]
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        count = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.monotonic()
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                count += len(out.new_token_ids)
        wall = time.monotonic() - t0
        tpot = statistics.mean((last[r] - first[r]) / max(max_tokens - 1, 1) for r in ids)
        ttft = statistics.mean(first[r] - t0 for r in ids)
        return Result("offline", len(batch), tpot * 1e3, ttft * 1e3, count / wall, count)


async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int, t0: float) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    first = last = 0.0
    n = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.monotonic()
            k = len(json.loads(line[6:])["choices"][0]["token_ids"])
            if k:
                if n == 0:
                    first = now
                last = now
                n += k
    return first - t0, (last - first) / max(n - 1, 1), n


async def _server_level(url: str, c: int, max_tokens: int) -> Result:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _one(client, "warm up", 4, time.monotonic())
        t0 = time.monotonic()
        res = await asyncio.gather(*(_one(client, p, max_tokens, t0) for p in prompts(c)))
        wall = time.monotonic() - t0
    total = sum(n for _, _, n in res)
    return Result("server", c, statistics.mean(t for _, t, _ in res) * 1e3,
                  statistics.mean(f for f, _, _ in res) * 1e3, total / wall, total)


def start_server(max_num_seqs: int, engine: str = "process") -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flag = "--engine-in-process" if engine == "thread" else "--no-engine-in-process"
    proc = subprocess.Popen([sys.executable, "-m", "sagellm_server.cli", "--port", str(port),
                             "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", flag],
                            env={**os.environ, "SAGELLM_API_KEY": ""})
    return f"http://127.0.0.1:{port}", proc


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def _best(runs: list[Result]) -> Result:
    """The run with the highest throughput (least disturbed by other load on the machine)."""
    return max(runs, key=lambda r: r.tokens_per_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--offline-main-thread", action="store_true",
                    help="step the offline engine from the main thread instead of a worker thread")
    ap.add_argument("--engine", nargs="+", default=["process"], choices=["process", "thread"],
                    help="how the started server runs its engine: its own process (the default) or "
                         "a thread of the server (--engine-in-process); several: one server each, "
                         "runs interleaved")
    args = ap.parse_args()
    servers: dict[str, tuple[str, subprocess.Popen[bytes] | None]] = {}
    if args.url is not None:
        servers = {"server": (args.url, None)}
    try:
        for e in ([] if args.url else args.engine):
            servers[f"server/{e}" if len(args.engine) > 1 else "server"] = start_server(
                max(args.concurrency), e)
        offline_engine = Offline(max(args.concurrency), args.offline_main_thread)
        for url, proc in servers.values():
            wait_healthy(url, proc)
        modes = ["offline", *servers]
        runs: dict[tuple[str, int], list[Result]] = {}
        for _ in range(args.repeats):
            for c in args.concurrency:
                for mode in modes:
                    if mode == "offline":
                        r = offline_engine.run(prompts(c), args.max_tokens)
                    else:
                        r = asyncio.run(_server_level(servers[mode][0], c, args.max_tokens))
                    runs.setdefault((mode, c), []).append(r)
                    print(f"{mode:>14} x{c:<3} TPOT {r.tpot_ms:8.1f} ms  {r.tokens_per_s:8.1f} tok/s  "
                          f"TTFT {r.ttft_ms:8.1f} ms", file=sys.stderr, flush=True)
    finally:
        for _, proc in servers.values():
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print(f"\nmodel: embedded SmolLM2-135M-Instruct, greedy, ignore_eos, {args.max_tokens} output tokens "
          f"per request, best of {args.repeats}, {os.cpu_count()} CPU cores")
    for mode in servers:
        offline = [_best(runs[("offline", c)]) for c in args.concurrency]
        server = [_best(runs[(mode, c)]) for c in args.concurrency]
        print(f"\n{mode}")
        print(f"{'clients':>7} | {'offline TPOT ms':>15} | {'server TPOT ms':>14} | {'TPOT overhead':>13} | "
              f"{'offline tok/s':>13} | {'server tok/s':>12} | {'tok/s ratio':>11} | {'server TTFT ms':>14}")
        for o, s in zip(offline, server, strict=True):
            print(f"{o.concurrency:>7} | {o.tpot_ms:>15.1f} | {s.tpot_ms:>14.1f} | "
                  f"{100 * (s.tpot_ms / o.tpot_ms - 1):>+12.1f}% | {o.tokens_per_s:>13.1f} | "
                  f"{s.tokens_per_s:>12.1f} | {s.tokens_per_s / o.tokens_per_s:>11.2f} | {s.ttft_ms:>14.1f}")


if __name__ == "__main__":
    main()
