"""What the server does when its engine dies or hangs.

The engine counts as dead when its process has exited, when its loop reported an exception, or
when the hang watchdog gave up on it; in-flight requests have been failed by then (see
``EngineClient._mark_dead``). :class:`EngineSupervisor` then either asks the server to exit with a
non-zero status (``--on-engine-death exit``, for an outside supervisor such as Kubernetes that
restarts the whole server), or starts a new engine with exponential backoff, at most
``max_restarts`` times within ``restart_window_s``; past that it asks the server to exit too.
While the engine is down ``/health`` answers 503, and 200 again once a restart succeeded.

Hangs: with requests in flight, the engine must show progress (a finished step: every message of
the engine process, or each step of the in-process loop) at least every ``hang_timeout_s``.
Progress is counted, not a heartbeat from a thread: such a heartbeat would go on beating while the
step itself is wedged (a stuck kernel or collective), which is the case to catch. The price is
that one legitimately longer step (a huge prefill on a slow device, a first-step compilation)
must stay under the timeout: it defaults to 120 s, far above any normal step, and 0 turns it off.
A hung engine process is killed (SIGKILL) and handled like any other death. A thread cannot be
killed, so a hung in-process engine is only marked dead and the server exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

from sagellm_server.async_engine import EngineClient
from sagellm_server.metrics import ServerMetrics

logger = logging.getLogger("sagellm.server")

#: Exit status of a server whose engine died for good (exit policy, or restarts exhausted).
EXIT_ENGINE_DEAD = 1


@dataclass(frozen=True)
class SupervisionPolicy:
    on_engine_death: Literal["restart", "exit"] = "restart"
    #: Most restart attempts within ``restart_window_s``; one more death and the server exits.
    max_restarts: int = 3
    restart_window_s: float = 600.0
    #: Delay before the first restart of a window; doubled for each further one, up to the max.
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    #: Seconds without progress, with requests in flight, before the engine counts as hung; 0: never.
    hang_timeout_s: float = 120.0
    #: Limit for a restarted engine to come up (``--engine-startup-timeout``); None: no limit.
    startup_timeout_s: float | None = None


class ExitRequest:
    """How the supervisor asks the server to stop, and with which exit status (the server polls
    it; the two are built independently, so neither needs the other)."""

    def __init__(self) -> None:
        self.code: int | None = None

    def request(self, code: int) -> None:
        if self.code is None:
            self.code = code

    @property
    def requested(self) -> bool:
        return self.code is not None


class EngineSupervisor:
    """Restarts a dead engine or asks the server to exit; kills a hung one. Event loop only."""

    def __init__(self, engine: EngineClient, policy: SupervisionPolicy, exit_request: ExitRequest,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.exit_request = exit_request
        self.metrics = metrics
        #: Monotonic times of the restart attempts within the current window.
        self._attempts: list[float] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._watch()))
        if self.policy.hang_timeout_s > 0:
            self._tasks.append(asyncio.ensure_future(self._watchdog()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _watch(self) -> None:
        engine, policy = self.engine, self.policy
        while True:
            await engine.died.wait()
            if engine.draining:
                return  # the server is stopping anyway
            if policy.on_engine_death == "exit" or not engine.can_restart:
                why = ("--on-engine-death exit" if policy.on_engine_death == "exit"
                       else "this engine cannot be restarted in process")
                logger.error("the engine is dead (%s); the server exits with status %d",
                             why, EXIT_ENGINE_DEAD)
                self.exit_request.request(EXIT_ENGINE_DEAD)
                return
            if not await self._restart():
                self.exit_request.request(EXIT_ENGINE_DEAD)
                return

    async def _restart(self) -> bool:
        """Bring the engine back, retrying with backoff within the budget; False: gave up."""
        policy = self.policy
        while True:
            now = time.monotonic()
            self._attempts = [t for t in self._attempts if now - t < policy.restart_window_s]
            if len(self._attempts) >= policy.max_restarts:
                logger.error("the engine needed more than %d restarts within %.0f s; giving up: the "
                             "server exits with status %d", policy.max_restarts,
                             policy.restart_window_s, EXIT_ENGINE_DEAD)
                return False
            delay = min(policy.backoff_max_s, policy.backoff_s * 2 ** len(self._attempts))
            logger.warning("restarting the engine in %.1f s (attempt %d of at most %d within %.0f s)",
                           delay, len(self._attempts) + 1, policy.max_restarts, policy.restart_window_s)
            await asyncio.sleep(delay)
            if self.engine.draining:
                return True  # shutting down meanwhile: nothing to restart for
            self._attempts.append(time.monotonic())
            try:
                await self.engine.restart(policy.startup_timeout_s)
            except Exception as exc:
                logger.error("restarting the engine failed: %s: %s", type(exc).__name__, exc)
                if getattr(exc, "error_type", None) == "EngineMismatch":
                    return False  # the same config gives the same engine: retrying cannot help
                continue
            if self.metrics is not None:
                self.metrics.engine_restarts.inc()
            logger.info("the engine is back; /health answers 200 again")
            return True

    async def _watchdog(self) -> None:
        engine, timeout = self.engine, self.policy.hang_timeout_s
        period = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            n = engine.num_in_flight
            stalled = time.monotonic() - engine.last_progress
            if n and engine.is_alive and stalled > timeout:
                engine.kill(f"the engine made no progress for {stalled:.0f} s with {n} requests in "
                            f"flight (--engine-hang-timeout {timeout:g})")
