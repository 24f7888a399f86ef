"""The control plane's HTTP routes.

Public routes (they need the API key when one is set, checked by the server's own
:class:`~sagellm_server.app.GuardMiddleware`, which also bounds request bodies):
``POST /v1/completions`` and ``/v1/chat/completions`` (routed to an engine, streaming included),
``GET /v1/models`` (every model a registered engine serves), ``GET /v1/engines`` (the engines with
health and load), ``GET /v1/engines/{id}``, ``GET /v1/engines/{id}/backends`` and
``GET /v1/backends`` (each engine's ``/v1/backends``), ``GET /metrics`` (the router's metrics and
every engine's, labelled ``engine``), ``GET /version``; ``GET /health`` needs no key.

Registration routes, below ``/internal/engines``, need the registration secret instead
(``Authorization: Bearer <secret>``, compared in constant time): ``POST /internal/engines``
registers, ``POST /internal/engines/{id}/heartbeat`` reports load (404: register again),
``DELETE /internal/engines/{id}`` deregisters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sagellm_server import __version__
from sagellm_server.app import GuardMiddleware
from sagellm_server.control_plane.metrics import RouterMetrics
from sagellm_server.control_plane.placement import PlacementPolicy
from sagellm_server.control_plane.protocol import REGISTRATION_PREFIX, EngineLoad, EngineRegistration
from sagellm_server.control_plane.registry import EngineHealth, EngineRegistry
from sagellm_server.control_plane.router import Router
from sagellm_server.http_limits import DEFAULT_BODY_TIMEOUT_S
from sagellm_server.metrics import CONTENT_TYPE
from sagellm_server.openai_protocol import ApiError, parse_json_object, validation_error

logger = logging.getLogger("sagellm.control_plane")


@dataclass
class ControlPlaneConfig:
    registration_secret: str
    api_key: str | None = None
    #: The key the router sends to engines (their ``--api-key``); None: none.
    engine_api_key: str | None = None
    max_request_body_bytes: int = 4 << 20
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    max_retries: int = 2
    connect_timeout: float = 5.0
    #: Seconds an engine may go without sending a byte of its response.
    upstream_timeout: float = 600.0
    #: Seconds each engine gets to answer ``/metrics`` and ``/v1/backends`` for the aggregate.
    fanout_timeout: float = 3.0
    sweep_interval: float = 1.0
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)


def create_control_plane(config: ControlPlaneConfig, registry: EngineRegistry | None = None,
                         transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The control plane's ASGI app. ``transport`` replaces the network to the engines (tests)."""
    if not config.registration_secret:
        raise ValueError("the control plane needs a registration secret")
    registry = registry or EngineRegistry()
    metrics = RouterMetrics(lambda: registry.records())
    expected_secret = f"Bearer {config.registration_secret}".encode()
    state: dict[str, Any] = {}

    def router() -> Router:
        return state["router"]  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.upstream_timeout, connect=config.connect_timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
            state["client"] = client
            state["router"] = Router(registry, config.placement, client, metrics,
                                     engine_api_key=config.engine_api_key, max_retries=config.max_retries)
            sweeper = asyncio.ensure_future(_sweep(registry, config.sweep_interval))
            try:
                yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    app = FastAPI(title="sageLLM control plane", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ApiError(500, f"internal server error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def body(request: Request) -> tuple[bytes, dict[str, Any]]:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ApiError(499, "the client closed the connection", code="client_closed") from None
        return raw, parse_json_object(raw)

    def check_secret(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_secret):
            what = "missing" if not given else "invalid"
            raise ApiError(401, f"{what} registration secret: send 'Authorization: Bearer <secret>'",
                           type="authentication_error", code="invalid_registration_secret")

    def parsed(model: type[BaseModel], obj: dict[str, Any]) -> Any:
        try:
            return model.model_validate(obj)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def engine_or_404(eid: str) -> Any:
        registry.sweep()
        rec = registry.engines.get(eid)
        if rec is None:
            raise ApiError(404, f"no engine '{eid[:200]}' is registered", code="engine_not_found")
        return rec

    # -- registration ------------------------------------------------------------------------

    @app.post(REGISTRATION_PREFIX)
    async def register(request: Request) -> dict[str, Any]:
        check_secret(request)
        info = parsed(EngineRegistration, (await body(request))[1])
        rec = registry.register(info)
        return {"id": rec.id, "health": rec.health.value}

    @app.post(REGISTRATION_PREFIX + "/{eid}/heartbeat")
    async def heartbeat(eid: str, request: Request) -> dict[str, Any]:
        check_secret(request)
        load = parsed(EngineLoad, (await body(request))[1])
        rec = registry.heartbeat(eid, load)
        if rec is None:
            raise ApiError(404, f"no engine '{eid[:200]}' is registered: register again",
                           code="engine_not_found")
        return {"id": rec.id, "health": rec.health.value}

    @app.delete(REGISTRATION_PREFIX + "/{eid}")
    async def deregister(eid: str, request: Request) -> dict[str, Any]:
        check_secret(request)
        return {"id": eid, "deregistered": registry.deregister(eid)}

    # -- information ---------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__, "role": "control-plane"}

    @app.get("/v1/engines")
    async def engines() -> dict[str, Any]:
        now = registry.clock()
        return {"object": "list", "data": [r.as_dict(now) for r in registry.records()]}

    @app.get("/v1/engines/{eid}")
    async def engine(eid: str) -> dict[str, Any]:
        return engine_or_404(eid).as_dict(registry.clock())  # type: ignore[no-any-return]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = []
        for name, recs in sorted(registry.models().items()):
            healthy = [r for r in recs if r.health is EngineHealth.HEALTHY]
            data.append({"id": name, "object": "model", "created": created, "owned_by": "sagellm",
                         "max_model_len": min(r.info.max_model_len for r in recs),
                         "num_engines": len(recs), "num_healthy_engines": len(healthy)})
        return {"object": "list", "data": data}

    async def engine_get(rec: Any, path: str) -> httpx.Response:
        return await state["client"].get(rec.info.url + path, headers=router().upstream_headers,  # type: ignore[no-any-return]
                                         timeout=config.fanout_timeout)

    @app.get("/v1/engines/{eid}/backends")
    async def engine_backends(eid: str) -> Response:
        rec = engine_or_404(eid)
        try:
            r = await engine_get(rec, "/v1/backends")
        except httpx.HTTPError as exc:
            raise ApiError(502, f"engine '{eid}' did not answer: {type(exc).__name__}",
                           type="server_error", code="engine_unreachable") from None
        return Response(r.content, status_code=r.status_code,
                        media_type=r.headers.get("content-type", "application/json"))

    async def fan_out(path: str) -> dict[str, httpx.Response | BaseException]:
        recs = [r for r in registry.records() if r.health is not EngineHealth.DOWN]
        got = await asyncio.gather(*(engine_get(r, path) for r in recs), return_exceptions=True)
        return {r.id: g for r, g in zip(recs, got, strict=True)}

    @app.get("/v1/backends")
    async def backends() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for eid, r in (await fan_out("/v1/backends")).items():
            if isinstance(r, httpx.Response) and r.status_code == 200:
                out[eid] = r.json()
            else:
                out[eid] = {"error": f"{type(r).__name__}" if isinstance(r, BaseException)
                            else f"HTTP {r.status_code}"}
        return {"engines": out}

    @app.get("/metrics")
    async def prometheus() -> Response:
        texts = {eid: r.text for eid, r in (await fan_out("/metrics")).items()
                 if isinstance(r, httpx.Response) and r.status_code == 200}
        return Response(metrics.render(texts), media_type=CONTENT_TYPE)

    # -- generation ----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        raw, obj = await body(request)
        return await router().forward("/v1/completions", raw, obj)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        raw, obj = await body(request)
        return await router().forward("/v1/chat/completions", raw, obj)

    app.add_middleware(GuardMiddleware, api_key=config.api_key,  # type: ignore[arg-type]
                       max_body_bytes=config.max_request_body_bytes, body_timeout=config.body_timeout,
                       public_prefixes=(REGISTRATION_PREFIX,))
    return app


async def _sweep(registry: EngineRegistry, interval: float) -> None:
    """Drop silent engines (and log health changes) even when nobody reads the registry."""
    while True:
        await asyncio.sleep(interval)
        registry.sweep()
