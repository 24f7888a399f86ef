"""The engine process and its wire, with a scripted engine built inside the child: outputs cross
the process boundary intact, one request's error stays with it, a dead engine is noticed, and the
child never outlives its parent."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fake_engine import BIG, BIG_TEXT_CHARS, EXPLODE, FAIL_ONE, FAIL_ONE_MESSAGE, REFUSE, SLOW, FakeTokenizer
from server_harness import free_port, is_running, wait_gone

from sagellm.config import EngineConfig
from sagellm.sampling_params import SamplingParams
from sagellm_server.app import ServerConfig, create_app
from sagellm_server.engine_process import EngineProcess, EngineStartupError
from sagellm_server.metrics import ServerMetrics

FACTORY = "fake_engine:make_engine"


def launch(**kw: int) -> EngineProcess:
    eng = EngineProcess(EngineConfig(max_num_seqs=kw.get("max_num_seqs", 4)),
                        max_queued_requests=kw.get("max_queued_requests", 4),
                        metrics=ServerMetrics("fake"), factory=FACTORY)
    eng.launch(timeout=120)
    return eng


@contextlib.contextmanager
def app_client(eng: EngineProcess) -> Iterator[httpx.Client]:
    """The app over real HTTP (uvicorn in a thread): responses stream and disconnects reach it,
    which Starlette's TestClient does not do."""
    assert eng.info is not None
    cfg = ServerConfig(served_model_name="fake", max_model_len=eng.info.max_model_len,
                       vocab_size=eng.info.vocab_size, log_interval=0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, cfg, FakeTokenizer(), eng.metrics),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[httpx.Client, EngineProcess]]:
    eng = launch()
    try:
        with app_client(eng) as c:
            yield c, eng
    finally:
        eng.shutdown()


def sse(lines: Iterator[str]) -> list[dict]:
    return [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]


ABORTED = 'sagellm:request_success_total{finished_reason="abort",model_name="fake"}'


def aborted(c: httpx.Client) -> float:
    line = next((ln for ln in c.get("/metrics").text.splitlines() if ln.startswith(ABORTED)), None)
    return float(line.split()[-1]) if line else 0.0


def test_ready_info_comes_from_the_child(shared: tuple[httpx.Client, EngineProcess]) -> None:
    _, eng = shared
    assert eng.info is not None and (eng.info.max_model_len, eng.info.vocab_size) == (64, 1000)
    assert eng.info.pid == eng.pid != os.getpid()


def test_outputs_cross_the_process_boundary(shared: tuple[httpx.Client, EngineProcess]) -> None:
    c, _ = shared
    r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == [3, 4, 5]
    assert body["choices"][0]["text"] == "3 4 5" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    body = {"prompt": ["ab", "abcd"], "max_tokens": 2, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/completions", json=body) as s:
        chunks = sse(s.iter_lines())
    by_index: dict[int, list[int]] = {0: [], 1: []}
    for ch in chunks[:-1]:
        by_index[ch["choices"][0]["index"]] += ch["choices"][0]["token_ids"]
    assert by_index == {0: [2, 3], 1: [4, 5]}
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


def test_engine_error_fails_only_that_request(shared: tuple[httpx.Client, EngineProcess]) -> None:
    c, eng = shared
    body = {"prompt": [1, SLOW], "max_tokens": 30, "stream": True, "return_token_ids": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: {"))  # the stream is running
        r = c.post("/v1/completions", json={"prompt": [5, REFUSE], "max_tokens": 2})
        assert r.status_code == 400 and str(REFUSE) in r.json()["error"]["message"], r.text
        rest = sse(lines)
    ids = [t for ch in [json.loads(first[6:]), *rest] for t in ch["choices"][0]["token_ids"]]
    assert ids == list(range(2, 32))  # the neighbour got every token
    assert eng.is_alive and c.get("/health").status_code == 200
    assert c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200


def test_engine_failing_one_request_fails_only_that_one(shared: tuple[httpx.Client, EngineProcess]) -> None:
    """``RequestOutput.error``: a 500 server_error for that request (an error event, then [DONE],
    on a stream); the requests beside it and the engine carry on."""
    c, eng = shared
    body = {"prompt": [1, SLOW], "max_tokens": 20, "stream": True, "return_token_ids": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: {"))
        r = c.post("/v1/completions", json={"prompt": [5, FAIL_ONE], "max_tokens": 5})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and FAIL_ONE_MESSAGE in err["message"], err
        with c.stream("POST", "/v1/completions", json={**body, "prompt": [FAIL_ONE]}) as failed:
            tail = [ln for ln in failed.iter_lines() if ln]
        assert tail[-1] == "data: [DONE]" and FAIL_ONE_MESSAGE in json.loads(tail[-2][6:])["error"]["message"]
        rest = sse(lines)
    ids = [t for ch in [json.loads(first[6:]), *rest] for t in ch["choices"][0]["token_ids"]]
    assert ids == list(range(2, 22))
    assert eng.is_alive and c.get("/health").status_code == 200
    assert 'finished_reason="error",model_name="fake"} 2.0' in c.get("/metrics").text


def test_disconnect_aborts_in_the_child_and_stats_follow(shared: tuple[httpx.Client, EngineProcess]) -> None:
    c, eng = shared
    steps_before = eng.snapshot.num_steps  # fresh: the engine reported it on going idle
    aborted_before = aborted(c)
    body = {"prompt": [1, SLOW], "max_tokens": 60, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        next(ln for ln in lines if ln.startswith("data: {"))
        deadline = time.monotonic() + 5
        while eng.snapshot.num_running != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.snapshot.num_running == 1 and eng.snapshot.kv_usage > 0
    # The client left after one token: the child drops the request and reports idle stats.
    deadline = time.monotonic() + 5
    while (eng.snapshot.num_running or eng.snapshot.kv_usage) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (eng.snapshot.num_running, eng.snapshot.kv_usage) == (0, 0.0)
    assert eng.snapshot.num_steps - steps_before < 40  # it did not run to the end
    assert f'{ABORTED} {aborted_before + 1:.1f}' in c.get("/metrics").text


def test_engine_raising_fails_in_flight_and_turns_health_503() -> None:
    eng = launch()
    with app_client(eng) as c:
        m = c.get("/metrics").text
        assert 'sagellm:engine_rss_bytes{model_name="fake"}' in m and "sagellm:server_rss_bytes" in m
        r = c.post("/v1/completions", json={"prompt": [1, EXPLODE], "max_tokens": 3})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead", r.text
        assert "simulated device failure" in r.json()["error"]["message"]
        # /health is public: down, and nothing about why.
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["error"] == {
            "message": "the engine is not running", "type": "service_unavailable_error",
            "param": None, "code": "engine_dead"}
        head = c.head("/health")
        assert head.status_code == 503 and head.content == b""
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert "simulated" not in r.text
        m = c.get("/metrics").text
        assert 'sagellm:engine_alive{model_name="fake"} 0.0' in m
        # A dead engine's load is not reported as live; its process has no memory to report.
        assert "sagellm:num_requests_running{" not in m and "sagellm:kv_cache_usage_perc{" not in m
        assert "sagellm:engine_rss_bytes{" not in m and "sagellm:server_rss_bytes{" in m
        wait_gone([eng.pid], 10)  # type: ignore[list-item]
    assert eng._proc.exitcode == 1


def test_engine_process_killed_mid_stream() -> None:
    eng = launch()
    with app_client(eng) as c:
        body = {"prompt": [1, SLOW], "max_tokens": 60, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            next(ln for ln in lines if ln.startswith("data: {"))
            os.kill(eng.pid, signal.SIGKILL)  # type: ignore[arg-type]
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["type"] == "server_error" and "SIGKILL" in err["message"], err
        h = c.get("/health")
        assert h.status_code == 503 and "SIGKILL" not in h.text
        assert not is_running(eng.pid)  # type: ignore[arg-type]  # reaped, not a zombie
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_shutdown_stops_and_joins_the_child() -> None:
    eng = launch()
    pid = eng.pid
    with app_client(eng) as c:
        assert c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1}).status_code == 200
        assert is_running(pid)  # type: ignore[arg-type]
    # Leaving the app ran its shutdown: the child was told to stop and has exited cleanly.
    assert eng._proc.exitcode == 0
    assert not is_running(pid)  # type: ignore[arg-type]


def test_startup_failure_names_the_error() -> None:
    eng = EngineProcess(EngineConfig(), factory="fake_engine:make_broken_engine")
    with pytest.raises(EngineStartupError, match="cannot be built") as exc:
        eng.launch(timeout=120)
    assert exc.value.error_type == "ValueError"
    assert exc.value.exitcode == 2


def test_child_exits_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sagellm.config import EngineConfig
        from sagellm_server.engine_process import EngineProcess

        if __name__ == "__main__":
            eng = EngineProcess(EngineConfig(), factory={FACTORY!r})
            eng.launch(timeout=120)
            print(eng.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), line
        child = int(line)
        assert is_running(child)
        parent.kill()
        parent.wait(10)
        wait_gone([child], 10)
    finally:
        parent.kill()
        parent.wait()


def test_commands_larger_than_the_pipe_are_buffered_not_blocking() -> None:
    """Prompts of megabytes: the parent's writes outrun the pipe, yet the event loop stays free
    and every request arrives whole (the fake answers with token ``len(prompt)``)."""
    eng = launch(max_num_seqs=8, max_queued_requests=8)

    async def run() -> tuple[list[int], int]:
        eng.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.ensure_future(ticker())
        sizes = [200_000 + i for i in range(6)]  # about 1.2 MB of JSON each
        handles = [eng.add(f"big-{i}", [7] * n, SamplingParams(max_tokens=1), stream=False)
                   for i, n in enumerate(sizes)]
        assert eng._wbuf, "the test should overflow the pipe"
        outs = await asyncio.wait_for(asyncio.gather(*(eng.result(h) for h in handles)), 60)
        tick.cancel()
        return [o.token_ids[0] for o in outs], ticks

    try:
        firsts, ticks = asyncio.run(run())
    finally:
        eng.shutdown()
    assert firsts == [200_000 + i for i in range(6)]
    assert ticks > 3  # the loop kept running while the commands drained


class _NonBlockingReaderLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, but ``add_reader`` leaves the fd non-blocking, as uvloop's does (libuv's
    ``uv_poll_init`` sets O_NONBLOCK on every fd it polls)."""

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        os.set_blocking(fd if isinstance(fd, int) else fd.fileno(), False)
        super().add_reader(fd, callback, *args)


def _uvloop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()  # type: ignore[no-any-return]


LOOPS = [pytest.param(_NonBlockingReaderLoop, id="asyncio-nonblocking"),
         pytest.param(_uvloop, id="uvloop", marks=pytest.mark.skipif(
             importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))]


@pytest.mark.parametrize("new_loop", LOOPS)
def test_outputs_larger_than_the_pipe_arrive_whole(new_loop: Any) -> None:
    """Many streams whose every step's message is megabytes: the parent reads them in pieces as
    they arrive (the fd non-blocking, as under uvloop) and never takes a half-read message for a
    dead engine (the false "engine process exited (still running)" seen with 64 clients)."""
    eng = launch(max_num_seqs=16, max_queued_requests=16)
    num_tokens = 6

    async def collect(handle: Any) -> tuple[list[int], int]:
        ids: list[int] = []
        chars = 0
        async for batch in eng.stream(handle):
            for out in batch:
                ids += out.new_token_ids
                chars += len(out.new_text)
        return ids, chars

    async def run() -> list[tuple[list[int], int]]:
        eng.start()
        handles = [eng.add(f"big-{i}", [BIG] * (i + 1), SamplingParams(max_tokens=num_tokens), stream=True)
                   for i in range(16)]
        return await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 120)

    loop = new_loop()
    try:
        results = loop.run_until_complete(run())
        assert eng.is_alive, eng.error
    finally:
        eng.shutdown()
        loop.close()
    for i, (ids, chars) in enumerate(results):
        assert ids == list(range(i + 1, i + 1 + num_tokens))
        assert chars == num_tokens * BIG_TEXT_CHARS


class _Sent:
    """The child's output end of the pipe, recording what is sent."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def send_bytes(self, data: bytes) -> None:
        self.messages.append(json.loads(data))


def test_stats_cross_the_wire_by_field_name_and_keep_counters_over_restarts() -> None:
    from fake_engine import FakeEngine

    from sagellm.engine.stats import EngineStats
    from sagellm_server.engine_core import EngineCore
    from sagellm_server.engine_process import _snapshot

    engine = FakeEngine()
    engine.steps = 4
    sent = _Sent()
    core = EngineCore(engine, None, sent)  # type: ignore[arg-type]
    core.send_stats_if_changed()
    core.send_stats_if_changed()  # unchanged: not sent again
    assert len(sent.messages) == 1
    op, wire = sent.messages[0]
    assert op == "stats" and wire == engine.get_stats().to_wire() and wire["num_steps"] == 4
    snap = _snapshot(wire)
    assert snap.alive and EngineStats.from_wire(snap.to_wire()) == engine.get_stats()
    # The first engine dies; its counters carry into the next one's snapshots, its load does not.
    carried = snap.down()
    assert (carried.alive, carried.num_steps, carried.num_kv_blocks) == (False, 4, 0)
    assert _snapshot({"num_steps": 1, "num_kv_blocks": 10}).plus_counters(carried).num_steps == 5
