"""Forwarding one OpenAI request to an engine: placement, retries and SSE passthrough.

A request that fails before anything reached its client (the connection to the engine failed,
the engine answered 5xx, or its response broke off before the first byte) is tried again on
another healthy engine, at most ``max_retries`` times. An engine the router could not connect to
is taken out of rotation for the registry's cool-down. Once a stream has begun, the client has
seen output, so a failure ends the stream with an OpenAI error event and ``data: [DONE]``.
Streams are relayed event by event as they arrive (an event is never split, so a client never
sees half of one followed by the error event).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from sagellm_server.control_plane.metrics import RouterMetrics
from sagellm_server.control_plane.placement import PlacementPolicy
from sagellm_server.control_plane.registry import EngineRecord, EngineRegistry
from sagellm_server.openai_protocol import ApiError

logger = logging.getLogger("sagellm.control_plane")

#: The response header naming the engine that served a request.
ENGINE_HEADER = "x-sagellm-engine"
_PASSED_HEADERS = ("content-type", "retry-after", "www-authenticate")
_DONE = b"data: [DONE]\n\n"


@dataclass
class _Failure:
    reason: str
    detail: str
    response: tuple[int, bytes, dict[str, str]] | None = None


class Router:
    def __init__(self, registry: EngineRegistry, policy: PlacementPolicy, client: httpx.AsyncClient,
                 metrics: RouterMetrics, engine_api_key: str | None = None, max_retries: int = 2) -> None:
        self.registry = registry
        self.policy = policy
        self.client = client
        self.metrics = metrics
        self.max_retries = max_retries
        self.upstream_headers = {"content-type": "application/json"}
        if engine_api_key:
            self.upstream_headers["authorization"] = f"Bearer {engine_api_key}"

    async def forward(self, path: str, raw: bytes, body: dict[str, Any]) -> Response:
        """Serve ``body`` (already parsed from ``raw``) at ``path`` on a healthy engine."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required and must be a string", param="model",
                           code="invalid_value")
        if model not in self.registry.models():
            shown = model if len(model) <= 200 else model[:200] + "..."
            raise ApiError(404, f"the model '{shown}' does not exist: no registered engine serves it",
                           param="model", code="model_not_found")
        key = self.policy.affinity_key(model, body)
        tried: set[str] = set()
        failure: _Failure | None = None
        for attempt in range(self.max_retries + 1):
            engines = [e for e in self.registry.healthy(model) if e.id not in tried]
            if not engines:
                break
            engine, placement = self.policy.choose(engines, key)
            tried.add(engine.id)
            if attempt:
                self.metrics.retries.labels(failure.reason if failure else "unknown").inc()
            engine.num_routed += 1
            self.metrics.routed(engine.id, model, placement.value)
            result = await self._try(engine, path, raw)
            if not isinstance(result, _Failure):
                return result
            failure = result
            logger.warning("engine %s failed a %s request before any output (%s)%s", engine.id,
                           path, failure.detail,
                           "; trying another engine" if attempt < self.max_retries else "")
        if failure is not None and failure.response is not None:
            status, content, headers = failure.response  # the engine's own error, passed on
            self.metrics.failures.labels(failure.reason).inc()
            return Response(content, status_code=status, headers=headers)
        self.metrics.failures.labels("no_healthy_engine" if failure is None else failure.reason).inc()
        what = (f"no healthy engine serves the model '{model}'" if failure is None
                else f"no engine could serve the request (last: {failure.detail})")
        raise ApiError(503, what, type="service_unavailable_error", code="no_healthy_engine")

    async def _try(self, engine: EngineRecord, path: str, raw: bytes) -> Response | _Failure:
        """One attempt on ``engine``: a response to send on, or why it failed before any output."""
        engine.num_in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                engine.num_in_flight -= 1

        upstream: httpx.Response | None = None
        try:
            request = self.client.build_request("POST", engine.info.url + path, content=raw,
                                                headers=self.upstream_headers)
            upstream = await self.client.send(request, stream=True)
            headers = {k: v for k, v in upstream.headers.items() if k.lower() in _PASSED_HEADERS}
            headers[ENGINE_HEADER] = engine.id
            is_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if upstream.status_code >= 500 or not is_stream:
                content = await upstream.aread()
                await upstream.aclose()
                release()
                if upstream.status_code >= 500:
                    return _Failure(f"http_{upstream.status_code}",
                                    f"HTTP {upstream.status_code}: {_error_message(content)}",
                                    (upstream.status_code, content, headers))
                return Response(content, status_code=upstream.status_code, headers=headers)
            chunks = upstream.aiter_raw()
            first = b""
            with contextlib.suppress(StopAsyncIteration):
                first = await chunks.__anext__()
        except httpx.HTTPError as exc:
            if upstream is not None:
                await upstream.aclose()
            release()
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                                httpx.ReadError)):
                self.registry.mark_unreachable(engine.id)
            return _Failure(type(exc).__name__, f"{type(exc).__name__}: {exc}")
        except BaseException:
            if upstream is not None:
                await upstream.aclose()
            release()
            raise
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(self._relay(engine, upstream, chunks, first, release),
                                 status_code=upstream.status_code, headers=headers)

    async def _relay(self, engine: EngineRecord, upstream: httpx.Response, chunks: AsyncIterator[bytes],
                     first: bytes, release: Any) -> AsyncIterator[bytes]:
        pending = first
        done = False
        try:
            while True:
                cut = pending.rfind(b"\n\n")
                if cut >= 0:
                    events, pending = pending[:cut + 2], pending[cut + 2:]
                    done = events.endswith(_DONE)
                    yield events
                try:
                    pending += await chunks.__anext__()
                except StopAsyncIteration:
                    break
            if not done or pending.strip():
                raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
        except httpx.HTTPError as exc:
            logger.warning("engine %s broke off a stream mid-way (%s: %s)", engine.id,
                           type(exc).__name__, exc)
            self.metrics.failures.labels("stream_broken").inc()
            self.registry.mark_unreachable(engine.id)
            err = ApiError(502, f"the engine serving this stream failed mid-way ({type(exc).__name__})",
                           type="server_error", code="engine_failed")
            yield f"data: {json.dumps(err.body())}\n\n".encode() + _DONE
        finally:
            release()
            await upstream.aclose()


def _error_message(content: bytes) -> str:
    try:
        return str(json.loads(content)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return content[:300].decode("utf-8", "replace")
