"""The control plane's routes over scripted engines (an httpx mock transport): auth, hostile
input, routing, retries before the first byte, streams that break mid-way, aggregation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sagellm_server.control_plane.app import ControlPlaneConfig, create_control_plane
from sagellm_server.control_plane.protocol import EngineLoad, EngineRegistration
from sagellm_server.control_plane.registry import EngineHealth, EngineRegistry
from sagellm_server.control_plane.router import ENGINE_HEADER

SECRET, KEY, ENGINE_KEY = "reg-secret", "api-key", "engine-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REG = {"Authorization": f"Bearer {SECRET}"}


def sse(*events: dict[str, Any]) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


class FakeEngines:
    """Engines ``e0``, ``e1``, ... at ``http://eN:8000``; ``mode[host]`` scripts each one."""

    def __init__(self) -> None:
        self.mode: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.auth: set[str] = set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        path = request.url.path
        self.calls.append((host, path))
        self.auth.add(request.headers.get("authorization", ""))
        mode = self.mode.get(host, "ok")
        if mode == "connect_error":
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/metrics":
            return httpx.Response(200, text=f'# HELP sagellm:engine_steps_total Steps.\n# TYPE sagellm:engine_steps_total counter\nsagellm:engine_steps_total{{model_name="m"}} {len(host)}\n')
        if path == "/v1/backends":
            return httpx.Response(200, json={"serving": {"name": f"cpu-{host}"}})
        if mode == "500":
            return httpx.Response(500, json={"error": {"message": f"{host} broke", "type": "server_error",
                                                       "param": None, "code": "engine_dead"}})
        if mode == "503":
            return httpx.Response(503, headers={"retry-after": "1"},
                                  json={"error": {"message": "queue full", "code": "queue_full"}})
        if mode == "400":
            return httpx.Response(400, json={"error": {"message": "bad max_tokens", "param": "max_tokens"}})
        body = json.loads(request.content)
        if mode == "break_before_first" and not body.get("stream"):
            async def broken() -> AsyncIterator[bytes]:
                raise httpx.ReadError("peer went away")
                yield b""  # an async generator

            return httpx.Response(200, headers={"content-type": "application/json"}, content=broken())
        if not body.get("stream"):
            return httpx.Response(200, json={"served_by": host, "echo": body["prompt"]})
        events = sse({"served_by": host, "n": 1}, {"served_by": host, "n": 2})

        async def stream() -> AsyncIterator[bytes]:
            if mode == "break_before_first":
                raise httpx.ReadError("peer went away")
            for i, ev in enumerate(events):
                if mode == "no_done" and ev.startswith(b"data: [DONE]"):
                    return  # the engine closed the stream cleanly, but short
                if mode == "break_mid_stream" and i == 1:
                    yield ev[:10]  # half an event, then the connection drops
                    raise httpx.RemoteProtocolError("incomplete chunked read")
                if mode == "split":
                    yield ev[:7]
                    yield ev[7:]
                else:
                    yield ev

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())


def info(i: int, models: tuple[str, ...] = ("m",)) -> EngineRegistration:
    return EngineRegistration(url=f"http://e{i}:8000", models=list(models), heartbeat_interval=1.0,
                              max_num_seqs=8)


@pytest.fixture
def engines() -> FakeEngines:
    return FakeEngines()


@pytest.fixture
def registry() -> EngineRegistry:
    return EngineRegistry()


@pytest.fixture
def cp(engines: FakeEngines, registry: EngineRegistry) -> Iterator[TestClient]:
    config = ControlPlaneConfig(registration_secret=SECRET, api_key=KEY, engine_api_key=ENGINE_KEY,
                                max_request_body_bytes=4096, max_retries=2)
    app = create_control_plane(config, registry, transport=httpx.MockTransport(engines))
    with TestClient(app) as client:
        yield client


def complete(cp: TestClient, prompt: str = "hello", stream: bool = False, model: str = "m") -> httpx.Response:
    return cp.post("/v1/completions", headers=AUTH, json={"model": model, "prompt": prompt, "stream": stream})


def events(r: httpx.Response) -> list[Any]:
    out = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- auth ---------------------------------------------------------------------------------------


def test_registration_needs_the_secret_not_the_api_key(cp: TestClient, registry: EngineRegistry) -> None:
    body = info(0).model_dump(mode="json")
    for headers in ({}, AUTH, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
        r = cp.post("/internal/engines", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_registration_secret"
    assert registry.engines == {}
    r = cp.post("/internal/engines", json=body, headers=REG)
    assert r.status_code == 200 and r.json() == {"id": "e0:8000", "health": "healthy"}
    hb = cp.post("/internal/engines/e0:8000/heartbeat", json={"num_running": 2}, headers=REG)
    assert hb.status_code == 200 and registry.engines["e0:8000"].load.num_running == 2
    assert cp.post("/internal/engines/e0:8000/heartbeat", json={}, headers=AUTH).status_code == 401
    assert cp.post("/internal/engines/nobody/heartbeat", json={}, headers=REG).status_code == 404
    assert cp.delete("/internal/engines/e0:8000", headers=AUTH).status_code == 401
    assert cp.delete("/internal/engines/e0:8000", headers=REG).json()["deregistered"] is True
    assert registry.engines == {}


def test_registration_rejects_bad_bodies_naming_the_field(cp: TestClient) -> None:
    r = cp.post("/internal/engines", content=b"{not json", headers=REG)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = cp.post("/internal/engines", json={**info(0).model_dump(mode="json"), "url": "file:///etc"}, headers=REG)
    assert r.status_code == 400 and r.json()["error"]["param"] == "url"
    r = cp.post("/internal/engines/x/heartbeat", json={"kv_usage": 7}, headers=REG)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_usage"


def test_public_routes_need_the_api_key(cp: TestClient) -> None:
    for path in ("/v1/engines", "/v1/models", "/metrics", "/v1/backends", "/version"):
        r = cp.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert cp.get(path, headers={"Authorization": f"Bearer {SECRET}"}).status_code == 401
        assert cp.get(path, headers=AUTH).status_code == 200, path
    assert cp.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401
    assert cp.get("/health").status_code == 200


# -- hostile input ------------------------------------------------------------------------------


def test_hostile_requests(cp: TestClient, registry: EngineRegistry, engines: FakeEngines) -> None:
    registry.register(info(0))
    r = cp.post("/v1/completions", headers=AUTH, content=b'{"model": "m", "prompt": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = cp.post("/v1/completions", headers=AUTH, content=b"[1, 2]")
    assert r.status_code == 400
    r = cp.post("/v1/completions", headers=AUTH, json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = complete(cp, model="x" * 3000)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.json()["error"]["message"]) < 400
    r = complete(cp, prompt="x" * 5000)
    assert r.status_code == 413
    assert engines.calls == []


def test_no_healthy_engine_is_503_with_retry_after(cp: TestClient, registry: EngineRegistry) -> None:
    rec = registry.register(info(0))
    registry.heartbeat(rec.id, EngineLoad(alive=False))
    r = complete(cp)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_healthy_engine"


# -- routing ------------------------------------------------------------------------------------


def test_routes_to_an_engine_with_the_engine_key(cp: TestClient, registry: EngineRegistry,
                                                 engines: FakeEngines) -> None:
    registry.register(info(0))
    registry.register(info(1, models=("other",)))
    r = complete(cp, prompt="hi")
    assert r.status_code == 200 and r.json() == {"served_by": "e0", "echo": "hi"}
    assert r.headers[ENGINE_HEADER] == "e0:8000"
    assert engines.auth == {f"Bearer {ENGINE_KEY}"}
    r = complete(cp, prompt="hi", model="other")
    assert r.json()["served_by"] == "e1"
    assert registry.engines["e0:8000"].num_in_flight == 0 and registry.engines["e0:8000"].num_routed == 1


def test_client_errors_pass_through_without_retry(cp: TestClient, registry: EngineRegistry,
                                                  engines: FakeEngines) -> None:
    registry.register(info(0))
    registry.register(info(1))
    engines.mode = {"e0": "400", "e1": "400"}
    r = complete(cp)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert len(engines.calls) == 1


@pytest.mark.parametrize("failure", ["connect_error", "500", "503", "break_before_first"])
@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_output_is_retried_elsewhere(cp: TestClient, registry: EngineRegistry,
                                                    engines: FakeEngines, failure: str, stream: bool) -> None:
    for i in range(2):
        registry.register(info(i))
    # The affine engine of this prompt fails; the other must serve it.
    engines.mode = {"e0": "ok", "e1": "ok"}
    bad = complete(cp, prompt="affine", stream=stream).headers[ENGINE_HEADER].split(":")[0]
    good = "e1" if bad == "e0" else "e0"
    engines.mode[bad] = failure
    engines.calls.clear()
    r = complete(cp, prompt="affine", stream=stream)
    assert r.status_code == 200 and r.headers[ENGINE_HEADER] == f"{good}:8000"
    served = events(r)[0]["served_by"] if stream else r.json()["served_by"]
    assert served == good
    assert [h for h, _ in engines.calls] == [bad, good]
    unreachable = registry.engines[f"{bad}:8000"].health is EngineHealth.UNREACHABLE
    assert unreachable == (failure in ("connect_error", "break_before_first"))
    assert all(e.num_in_flight == 0 for e in registry.engines.values())
    page = cp.get("/metrics", headers=AUTH).text
    assert 'sagellm:router_retries_total{reason=' in page


def test_retries_are_bounded_and_the_last_error_is_passed_on(cp: TestClient, registry: EngineRegistry,
                                                             engines: FakeEngines) -> None:
    for i in range(5):
        registry.register(info(i))
        engines.mode[f"e{i}"] = "503"
    r = complete(cp)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert len(engines.calls) == 3  # the first try and max_retries=2 more
    engines.mode = {f"e{i}": "connect_error" for i in range(5)}
    engines.calls.clear()
    r = complete(cp)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "ConnectError" in r.json()["error"]["message"] and len(engines.calls) == 3


def test_streams_pass_through_event_by_event(cp: TestClient, registry: EngineRegistry,
                                             engines: FakeEngines) -> None:
    registry.register(info(0))
    engines.mode["e0"] = "split"
    r = complete(cp, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events(r) == [{"served_by": "e0", "n": 1}, {"served_by": "e0", "n": 2}, "[DONE]"]


@pytest.mark.parametrize("mode", ["break_mid_stream", "no_done"])
def test_a_stream_that_breaks_after_output_ends_with_an_error_event(
        cp: TestClient, registry: EngineRegistry, engines: FakeEngines, mode: str) -> None:
    registry.register(info(0))
    registry.register(info(1))
    engines.mode = {"e0": mode, "e1": mode}
    r = complete(cp, stream=True)
    got = events(r)  # whole events only: the half event is never forwarded
    assert got[0]["n"] == 1
    if mode == "no_done":
        assert got[1]["n"] == 2
    assert got[-2]["error"]["code"] == "engine_failed" and got[-1] == "[DONE]"
    assert len(engines.calls) == 1  # output had reached the client: no retry
    assert all(e.num_in_flight == 0 for e in registry.engines.values())


# -- information --------------------------------------------------------------------------------


def test_engines_models_backends_and_metrics(cp: TestClient, registry: EngineRegistry,
                                            engines: FakeEngines) -> None:
    registry.register(info(0, models=("m", "alias")))
    rec = registry.register(info(12))
    registry.heartbeat(rec.id, EngineLoad(num_running=3, kv_usage=0.5))
    listed = cp.get("/v1/engines", headers=AUTH).json()["data"]
    assert [(e["id"], e["health"]) for e in listed] == [("e0:8000", "healthy"), ("e12:8000", "healthy")]
    assert listed[1]["load"]["num_running"] == 3 and listed[1]["load"]["kv_usage"] == 0.5
    assert cp.get("/v1/engines/e12:8000", headers=AUTH).json()["id"] == "e12:8000"
    assert cp.get("/v1/engines/nope", headers=AUTH).status_code == 404
    models = {m["id"]: m for m in cp.get("/v1/models", headers=AUTH).json()["data"]}
    assert set(models) == {"m", "alias"} and models["m"]["num_healthy_engines"] == 2
    b = cp.get("/v1/engines/e12:8000/backends", headers=AUTH)
    assert b.status_code == 200 and b.json() == {"serving": {"name": "cpu-e12"}}
    assert cp.get("/v1/backends", headers=AUTH).json()["engines"]["e0:8000"] == {"serving": {"name": "cpu-e0"}}
    assert cp.get("/v1/engines/nope/backends", headers=AUTH).status_code == 404
    engines.mode["e0"] = "connect_error"
    assert cp.get("/v1/engines/e0:8000/backends", headers=AUTH).status_code == 502
    assert "error" in cp.get("/v1/backends", headers=AUTH).json()["engines"]["e0:8000"]
    page = cp.get("/metrics", headers=AUTH).text
    samples = {(s.name, s.labels.get("engine") or s.labels.get("health")): s.value
               for fam in text_string_to_metric_families(page) for s in fam.samples}
    assert samples[("sagellm:engine_steps_total", "e12:8000")] == 3  # len("e12") from the fake
    assert ("sagellm:engine_steps_total", "e0:8000") not in samples  # it did not answer
    assert samples[("sagellm:router_engines", "healthy")] == 2
    assert samples[("sagellm:router_engines", "unreachable")] == 0  # fan-out failures do not count
    assert page.count("# TYPE sagellm:engine_steps_total counter") == 1
