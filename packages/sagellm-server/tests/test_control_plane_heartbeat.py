"""The engine's side: registration, heartbeats, re-registration, backoff, deregistration, and
``sagellm-server``'s control-plane flags."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sagellm_server.async_engine import EngineSnapshot
from sagellm_server.control_plane import server_flags
from sagellm_server.control_plane.heartbeat import Heartbeat, engine_load
from sagellm_server.control_plane.protocol import EngineLoad, EngineRegistration

SECRET = "s3cret"


class FakeControlPlane:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.known: set[str] = set()
        self.down = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        if request.headers.get("authorization") != f"Bearer {SECRET}":
            return httpx.Response(401, json={"error": {"message": "no"}})
        path = request.url.path
        if request.method == "POST" and path == "/internal/engines":
            self.known.add("e1")
            return httpx.Response(200, json={"id": "e1", "health": "healthy"})
        if path == "/internal/engines/e1/heartbeat":
            return httpx.Response(200 if "e1" in self.known else 404, json={})
        if request.method == "DELETE":
            self.known.discard("e1")
            return httpx.Response(200, json={})
        return httpx.Response(404, json={})

    def paths(self) -> list[str]:
        return [f"{m} {p}" for m, p, _ in self.calls]


def heartbeat(cp: FakeControlPlane, secret: str = SECRET, interval: float = 0.01) -> Heartbeat:
    reg = EngineRegistration(url="http://10.0.0.7:8000", models=["m"], heartbeat_interval=interval)
    n = iter(range(10_000))
    return Heartbeat("http://cp:8080/", secret, reg, lambda: EngineLoad(num_running=next(n)),
                     backoff_max=0.05, transport=httpx.MockTransport(cp))


async def run_until(hb: Heartbeat, cond: Any, timeout: float = 5.0) -> None:
    hb.start()
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_registers_beats_with_fresh_load_and_deregisters() -> None:
    cp = FakeControlPlane()

    async def main() -> None:
        hb = heartbeat(cp)
        await run_until(hb, lambda: hb.num_heartbeats >= 3)
        assert hb.engine_id == "e1"
        await hb.stop()

    asyncio.run(main())
    paths = cp.paths()
    assert paths[0] == "POST /internal/engines" and paths[-1] == "DELETE /internal/engines/e1"
    assert cp.calls[0][2]["url"] == "http://10.0.0.7:8000" and cp.calls[0][2]["models"] == ["m"]
    running = [body["num_running"] for m, p, body in cp.calls if p.endswith("/heartbeat")]
    assert running == sorted(running) and len(set(running)) == len(running)  # read anew each time
    assert cp.known == set()


def test_a_forgotten_engine_registers_again() -> None:
    cp = FakeControlPlane()

    async def main() -> None:
        hb = heartbeat(cp)
        await run_until(hb, lambda: hb.num_heartbeats >= 1)
        cp.known.clear()  # the control plane restarted
        await run_until(hb, lambda: cp.paths().count("POST /internal/engines") >= 2 and hb.num_heartbeats >= 2)
        await hb.stop(deregister=False)

    asyncio.run(main())
    assert "DELETE /internal/engines/e1" not in cp.paths()


def test_failures_are_logged_once_retried_with_backoff_and_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    cp = FakeControlPlane()
    cp.down = True

    async def main() -> None:
        hb = heartbeat(cp)
        await run_until(hb, lambda: hb.num_failures >= 4)
        cp.down = False
        await run_until(hb, lambda: hb.num_heartbeats >= 1)
        assert hb.num_failures == 0
        await hb.stop()

    with caplog.at_level(logging.DEBUG, logger="sagellm.server"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not register with the control plane" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_wrong_secret_says_so(caplog: pytest.LogCaptureFixture) -> None:
    cp = FakeControlPlane()

    async def main() -> None:
        hb = heartbeat(cp, secret="wrong")
        await run_until(hb, lambda: hb.num_failures >= 1)
        await hb.stop()

    with caplog.at_level(logging.WARNING, logger="sagellm.server"):
        asyncio.run(main())
    assert "refused the registration secret" in caplog.text
    assert "wrong" not in caplog.text


def test_stop_before_start_and_twice_is_harmless() -> None:
    async def main() -> None:
        hb = heartbeat(FakeControlPlane())
        await hb.stop()
        hb.start()
        await hb.stop()
        await hb.stop()

    asyncio.run(main())


def test_attach_runs_it_for_the_apps_life() -> None:
    cp = FakeControlPlane()
    hb = heartbeat(cp)
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def inner(app: FastAPI) -> AsyncIterator[None]:
        order.append("app up")
        yield
        order.append(f"app down (deregistered: {'DELETE /internal/engines/e1' in cp.paths()})")

    app = FastAPI(lifespan=inner)
    hb.attach(app)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await run_until(hb, lambda: hb.num_heartbeats >= 1)

    asyncio.run(main())
    assert order == ["app up", "app down (deregistered: True)"]


def test_engine_load_reads_the_snapshot() -> None:
    engine = SimpleNamespace(snapshot=EngineSnapshot(num_running=3, num_waiting=2, kv_usage=0.25),
                             num_in_flight=6, is_alive=True, draining=False)
    assert engine_load(engine) == EngineLoad(num_running=3, num_waiting=2, num_in_flight=6,
                                             kv_usage=0.25, alive=True, draining=False)
    engine.snapshot = EngineSnapshot(alive=False)
    engine.draining = True
    load = engine_load(engine)
    assert not load.alive and load.draining


# -- sagellm-server's flags -----------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    server_flags.add_arguments(p)
    return p.parse_args(argv)


def test_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGELLM_CONTROL_PLANE_SECRET", raising=False)
    assert server_flags.check_arguments(parse()) is None  # off
    assert "registration secret" in str(server_flags.check_arguments(parse("--control-plane", "http://cp:1")))
    args = parse("--control-plane", "http://cp:1", "--control-plane-secret", "x", "--port", "9001")
    assert server_flags.check_arguments(args) is None and args.advertise_url == "http://127.0.0.1:9001"
    monkeypatch.setenv("SAGELLM_CONTROL_PLANE_SECRET", "from-env")
    args = parse("--control-plane", "http://cp:1", "--host", "0.0.0.0")
    assert server_flags.check_arguments(args) is None and args.control_plane_secret == "from-env"
    assert not args.advertise_url.startswith("http://0.0.0.0")
    assert "--control-plane must be" in str(server_flags.check_arguments(parse("--control-plane", "cp:1")))
    bad_url = parse("--control-plane", "http://cp:1", "--advertise-url", "gopher://x:1")
    assert str(server_flags.check_arguments(bad_url)).startswith("--advertise-url")
    bad_interval = parse("--control-plane", "http://cp:1", "--heartbeat-interval", "0")
    assert str(server_flags.check_arguments(bad_interval)).startswith("--heartbeat-interval")
    info = SimpleNamespace(backend="cpu", device_name="cpu (2 cores)", max_model_len=256,
                           num_kv_blocks=10, block_size=16)
    args = parse("--control-plane", "http://cp:1", "--advertise-url", "http://me:1")
    args.max_num_seqs = 8
    assert server_flags.check_arguments(args) is None
    hb = server_flags.heartbeat(args, info, ["m"], SimpleNamespace())  # type: ignore[arg-type]
    assert hb is not None and hb.registration.url == "http://me:1" and hb.registration.max_num_seqs == 8
    assert hb.registration.kv_capacity_tokens == 160
    assert server_flags.heartbeat(parse(), info, ["m"], SimpleNamespace()) is None  # type: ignore[arg-type]
