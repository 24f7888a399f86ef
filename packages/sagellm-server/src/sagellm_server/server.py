"""The HTTP server process's lifetime: uvicorn, with a graceful shutdown and an exit status.

On SIGTERM (or SIGINT) :class:`GracefulServer` first stops admitting (new requests get 503
``shutting_down``; the listening socket closes, so new connections are refused), lets the requests
in flight finish for up to ``shutdown_timeout`` seconds, then ends the rest (a stream gets an error
event and ``[DONE]``, a non-streaming request a 503), and only then runs uvicorn's own shutdown
(connections close, the app's lifespan stops the engine). The process exits 0 after that, where
plain uvicorn re-raises the signal (status -15) and, at its own timeout, cancels streams mid-way
without ``[DONE]``. A second signal skips the wait. The engine supervisor asks for a non-zero exit
through an :class:`ExitRequest`, polled on uvicorn's tick.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from sagellm_server.async_engine import EngineClient
from sagellm_server.supervisor import ExitRequest

logger = logging.getLogger("sagellm.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, exit_request: ExitRequest,
                 shutdown_timeout: float = 30.0,
                 before_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self.engine = engine
        self.exit_request = exit_request
        self.shutdown_timeout = shutdown_timeout
        #: Awaited first on shutdown (the control plane deregistration: routers stop sending here).
        self.before_drain = before_drain

    @property
    def exit_code(self) -> int:
        return self.exit_request.code or 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: that one re-raises the signal once shut down, so even a clean drain
        # ends with status -15.
        if self.should_exit:
            self.force_exit = True
        else:
            logger.info("received %s: shutting down (in-flight requests get up to %g s)",
                        signal.Signals(sig).name, self.shutdown_timeout)
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.exit_request.requested:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.before_drain is not None:
            try:
                await self.before_drain()
            except Exception:  # never let it stop the drain
                logger.exception("error before the drain")
        await self.drain()
        await super().shutdown(sockets)

    async def drain(self) -> None:
        """Admit nothing new; wait for the requests in flight, up to ``shutdown_timeout``; end the rest."""
        engine = self.engine
        engine.begin_drain()
        for server in self.servers:
            server.close()  # refuse new connections now (uvicorn's shutdown closes them again)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        if engine.num_in_flight:
            logger.info("waiting for %d requests in flight", engine.num_in_flight)
        while engine.num_in_flight and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            n = engine.end_remaining()
            logger.warning("ended %d requests still in flight at the shutdown deadline", n)
