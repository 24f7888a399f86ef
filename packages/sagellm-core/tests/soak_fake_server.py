"""A tiny stand-in for sagellm-server that streams SSE as fast as asked, for the soak's tests.

asyncio streams, HTTP/1.1, one request per connection. ``POST`` to either generation route
streams ``max_tokens`` chunks in the real server's layout (one token each, ``pace_s`` apart);
bodies that are not a JSON object with ``max_tokens`` >= 1 get a 400, except the faults the test
asks for. ``/metrics`` reports what :class:`FakeState` says. Also runnable on its own, several
processes on one port (SO_REUSEPORT), to measure how many events/s the soak client can take::

    python soak_fake_server.py --port 18555 --pace-ms 10 --procs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FakeState:
    pace_s: float = 0.0
    #: Faults: 500 for bodies that fail to parse; an error event / no [DONE] / one token short
    #: on every n-th stream (0: never).
    crash_on_bad_json: bool = False
    error_event_every: int = 0
    no_done_every: int = 0
    short_every: int = 0
    #: /metrics: blocks that stay taken, RSS growth per stream, restarts per stream.
    leak_blocks: int = 0
    rss_step: int = 0
    restarts_step: float = 0.0
    #: Engine RSS growth per second for the first ``engine_rss_grow_s`` seconds after the first
    #: stream, then flat: the prefix cache filling the KV pool, for the warm-up's steady check.
    engine_rss_per_s: int = 0
    engine_rss_grow_s: float = 0.0
    first_stream_t: float | None = None
    export_optional: bool = True
    streams: int = 0
    bad: int = 0
    aborted: int = 0
    seen_max_model_len: int = 512
    lock: threading.Lock = field(default_factory=threading.Lock)

    def metrics(self) -> str:
        lines = ["# HELP sagellm:num_requests_running x", "# TYPE sagellm:num_requests_running gauge",
                 'sagellm:num_requests_running{model_name="fake"} 0.0',
                 'sagellm:num_requests_waiting{model_name="fake"} 0.0',
                 'sagellm:num_kv_blocks{model_name="fake"} 100.0',
                 f'sagellm:num_free_kv_blocks{{model_name="fake"}} {100 - self.leak_blocks}.0',
                 'sagellm:engine_alive{model_name="fake"} 1.0',
                 'sagellm:request_success_total{finished_reason="length",model_name="fake"} 3.0',
                 'sagellm:request_success_total{finished_reason="abort",model_name="fake"} 2.0']
        grown = 0.0 if self.first_stream_t is None else \
            self.engine_rss_per_s * min(self.engine_rss_grow_s, time.monotonic() - self.first_stream_t)
        if self.export_optional:
            lines += [f'sagellm:engine_restarts_total{{model_name="fake"}} {self.restarts_step * self.streams}',
                      f"sagellm:server_rss_bytes {100_000_000 + self.rss_step * self.streams}",
                      f'sagellm:engine_rss_bytes{{model_name="fake",rank="0"}} {200_000_000 + grown:.0f}']
        return "\n".join(lines) + "\n"


def _chunk(i: int, finish: bool) -> bytes:
    fr = '"length"' if finish else "null"
    ev = (f'data: {{"id":"cmpl-x","object":"text_completion","created":1,"model":"fake","choices":'
          f'[{{"index":0,"text":"t{i}","logprobs":null,"finish_reason":{fr},"token_ids":[{i}]}}]}}\n\n')
    return f"{len(ev):x}\r\n{ev}\r\n".encode()


async def _reply(w: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "application/json") -> None:
    w.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n".encode() + body)
    await w.drain()


async def _handle(state: FakeState, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
        line, *hdrs = head.decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ", 2)
        length = next((int(h.split(":", 1)[1]) for h in hdrs if h.lower().startswith("content-length")), 0)
        body = await r.readexactly(length) if length else b""
        if method == "GET":
            if path == "/metrics":
                await _reply(w, 200, state.metrics().encode(), "text/plain")
            else:
                await _reply(w, 200, json.dumps({"data": [{"id": "fake", "max_model_len":
                                                            state.seen_max_model_len}]}).encode())
            return
        try:
            req = json.loads(body)
            ok = isinstance(req, dict) and isinstance(req.get("max_tokens"), int) and req["max_tokens"] >= 1 \
                and req.get("model", "fake") == "fake"
        except (ValueError, RecursionError):
            req, ok = None, False
            if state.crash_on_bad_json:
                await _reply(w, 500, b'{"error": {"message": "boom"}}')
                return
        if not ok:
            with state.lock:
                state.bad += 1
            await _reply(w, 400, b'{"error": {"message": "bad"}}')
            return
        await _stream(state, req, w)
    except (asyncio.IncompleteReadError, ConnectionError):
        with state.lock:
            state.aborted += 1
    finally:
        w.close()


async def _stream(state: FakeState, req: dict, w: asyncio.StreamWriter) -> None:  # type: ignore[type-arg]
    with state.lock:
        state.streams += 1
        k = state.streams
        if state.first_stream_t is None:
            state.first_stream_t = time.monotonic()
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    n = req["max_tokens"] - (1 if state.short_every and k % state.short_every == 0 else 0)
    for i in range(n):
        if state.error_event_every and k % state.error_event_every == 0 and i == 1:
            ev = b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
            w.write(f"{len(ev):x}\r\n".encode() + ev + b"\r\n")
            break
        w.write(_chunk(i, i == n - 1))
        await w.drain()
        if state.pace_s:
            await asyncio.sleep(state.pace_s)
    if not (state.no_done_every and k % state.no_done_every == 0):
        w.write(_chunk_raw(b"data: [DONE]\n\n"))
    w.write(b"0\r\n\r\n")
    await w.drain()


def _chunk_raw(ev: bytes) -> bytes:
    return f"{len(ev):x}\r\n".encode() + ev + b"\r\n"


class FakeServer:
    """Runs in a daemon thread of the test process; ``url`` once started."""

    def __init__(self, state: FakeState | None = None) -> None:
        self.state = state or FakeState()
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        # Listen now, so that requests sent before the thread's loop has started queue instead of
        # being refused (which made the first /metrics and /v1/models of a soak come back empty).
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sock = sock
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(
            lambda r, w: _handle(self.state, r, w), sock=self._sock, backlog=1024))
        self.loop.run_until_complete(server.serve_forever())


def _serve_process(port: int, pace_s: float) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        state = FakeState(pace_s=pace_s)
        server = await asyncio.start_server(lambda r, w: _handle(state, r, w), sock=sock, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pace-ms", type=float, default=0.0)
    ap.add_argument("--procs", type=int, default=1)
    a = ap.parse_args()
    procs = [multiprocessing.Process(target=_serve_process, args=(a.port, a.pace_ms / 1e3))
             for _ in range(a.procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
