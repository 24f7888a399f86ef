"""The engine's side of the control plane: register, heartbeat the load, deregister.

:class:`Heartbeat` runs as an asyncio task on the server's event loop and talks to the control
plane with an ``httpx.AsyncClient``, so it never blocks serving; its load numbers are read from
the engine's latest stats snapshot (no call into the engine). A failure is logged (once, then
quietly until it recovers) and retried with exponential backoff; an answer of 404 to a
heartbeat (the control plane restarted, or dropped this engine) makes it register again.
Serving never depends on the control plane being there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from sagellm_server.control_plane.protocol import REGISTRATION_PREFIX, EngineLoad, EngineRegistration

logger = logging.getLogger("sagellm.server")


def engine_load(engine: Any) -> EngineLoad:
    """The load of an :class:`~sagellm_server.async_engine.EngineClient`, from its snapshot."""
    s = engine.snapshot
    return EngineLoad(num_running=s.num_running, num_waiting=s.num_waiting,
                      num_in_flight=engine.num_in_flight, kv_usage=min(1.0, max(0.0, s.kv_usage)),
                      alive=bool(s.alive and engine.is_alive), draining=bool(engine.draining))


class Heartbeat:
    def __init__(self, control_plane: str, secret: str, registration: EngineRegistration,
                 load: Callable[[], EngineLoad], *, backoff_max: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = control_plane.rstrip("/") + REGISTRATION_PREFIX
        self.registration = registration
        self.load = load
        self.interval = registration.heartbeat_interval
        self.backoff_max = max(backoff_max, self.interval)
        self._headers = {"authorization": f"Bearer {secret}"}
        self._transport = transport
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.engine_id: str | None = None
        #: Failures in a row (0 while the control plane answers).
        self.num_failures = 0
        self.num_heartbeats = 0

    def start(self) -> None:
        timeout = httpx.Timeout(min(5.0, max(1.0, self.interval * 2)))
        self._client = httpx.AsyncClient(timeout=timeout, transport=self._transport)
        self._task = asyncio.ensure_future(self._run())

    def attach(self, app: Any) -> None:
        """Run for the life of ``app`` (a Starlette/FastAPI app): start once the app's own
        start-up is done, stop (deregistering) before the app's own shutdown."""
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with inner(a) as state:
                self.start()
                try:
                    yield state
                finally:
                    await self.stop()

        app.router.lifespan_context = lifespan

    async def stop(self, deregister: bool = True) -> None:
        """Stop beating and, if registered, deregister (bounded: shutdown never waits long)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if deregister and self.engine_id is not None:
                with contextlib.suppress(httpx.HTTPError):
                    await client.delete(f"{self.base}/{self.engine_id}", headers=self._headers, timeout=2.0)
                    logger.info("deregistered from the control plane as %s", self.engine_id)
        finally:
            self.engine_id = None
            await client.aclose()

    async def _run(self) -> None:
        assert self._client is not None
        delay = self.interval
        while True:
            try:
                if self.engine_id is None:
                    await self._register()
                else:
                    await self._beat()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self._failed(exc)
                delay = min(self.backoff_max, max(self.interval, delay * 2))
            else:
                if self.num_failures:
                    logger.info("the control plane answers again (after %d failures)", self.num_failures)
                self.num_failures = 0
                delay = self.interval
            await asyncio.sleep(delay)

    async def _register(self) -> None:
        assert self._client is not None
        body = self.registration.model_copy(update={"load": self.load()}).model_dump(mode="json")
        r = await self._client.post(self.base, json=body, headers=self._headers)
        r.raise_for_status()
        self.engine_id = str(r.json()["id"])
        logger.info("registered with the control plane as %s (advertising %s)", self.engine_id,
                    self.registration.url)

    async def _beat(self) -> None:
        assert self._client is not None
        r = await self._client.post(f"{self.base}/{self.engine_id}/heartbeat",
                                    json=self.load().model_dump(mode="json"), headers=self._headers)
        if r.status_code == 404:
            logger.info("the control plane does not know engine %s any more: registering again",
                        self.engine_id)
            self.engine_id = None
            await self._register()
            return
        r.raise_for_status()
        self.num_heartbeats += 1

    def _failed(self, exc: BaseException) -> None:
        self.num_failures += 1
        log = logger.warning if self.num_failures == 1 else logger.debug
        what = "register with" if self.engine_id is None else "heartbeat to"
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
            detail = "the control plane refused the registration secret (--control-plane-secret)"
        log("could not %s the control plane at %s: %s (retrying with backoff)", what,
            self.base.removesuffix(REGISTRATION_PREFIX), detail)

