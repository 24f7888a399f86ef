"""One engine, many asyncio clients.

:class:`EngineClient` is the event-loop side that both ways of running the engine share. By
default the engine runs in a process of its own (``sagellm_server.engine_process``); with
``--engine-in-process``, :class:`AsyncEngine` runs it here instead:
``LLMEngine`` is synchronous and not thread-safe, so exactly one background thread (the engine
loop) owns it. The event loop hands it commands through a ``queue.SimpleQueue`` (add, abort,
stop); after every step the loop thread hands the whole batch of outputs back with a single
``loop.call_soon_threadsafe``, and the event loop routes each output to its request: an
``asyncio.Queue`` for streaming requests, a future resolved only by the last output otherwise.
Per-token latency histograms are observed there too, off the engine's critical path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sagellm.engine.stats import EngineStats
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams
from sagellm_server.metrics import ServerMetrics

logger = logging.getLogger("sagellm.server")

#: How often (seconds) the loop refreshes its stats snapshot while busy; always when idle.
STATS_INTERVAL = 0.1


class EngineLike(Protocol):
    """The part of :class:`sagellm.engine.llm_engine.LLMEngine` the loop uses."""

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str, *,
                    cache_salt: str | None = None) -> str: ...
    def abort_request(self, request_id: str) -> bool: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def get_stats(self) -> EngineStats: ...


class EngineError(RuntimeError):
    """A request could not be served by the engine; ``code`` names why, for the API error."""

    code = "engine_error"


class EngineDeadError(EngineError):
    """The engine (loop or process) has stopped; nothing is served until it is back."""

    code = "engine_dead"


class EngineRequestError(EngineError):
    """The engine failed this one request and goes on serving the others."""


class ServerShuttingDownError(EngineError):
    """The server is shutting down: it admits nothing new, and ended this request at the deadline."""

    code = "shutting_down"


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows."""


@dataclass(frozen=True)
class EngineSnapshot(EngineStats):
    """The engine's latest stats as the server holds them, with whether that engine still runs
    and when they were taken (``time.monotonic()`` of this process)."""

    alive: bool = True
    time: float = field(default_factory=time.monotonic)

    def down(self) -> EngineSnapshot:
        """What to report once this engine is gone: no load (its gauges are not live any more),
        and its counters kept, so they stay monotonic across a restart."""
        return EngineSnapshot(**{name: getattr(self, name) for name in self.COUNTERS}, alive=False)

    def plus_counters(self, base: EngineSnapshot) -> EngineSnapshot:
        """This snapshot with ``base``'s counters added (those of the engines before a restart)."""
        return dataclasses.replace(
            self, **{name: getattr(self, name) + getattr(base, name) for name in self.COUNTERS})


class RequestHandle:
    """The event-loop side of one request."""

    __slots__ = ("request_id", "key", "num_prompt_tokens", "queue", "future", "arrival",
                 "last_token_time", "done", "num_choices", "finals", "logprobs", "prompt_logprobs")

    def __init__(self, request_id: str, stream: bool, loop: asyncio.AbstractEventLoop, key: int = 0,
                 num_prompt_tokens: int = 0, num_choices: int = 1) -> None:
        self.request_id = request_id
        #: ``SamplingParams.n``: the engine finishes each choice (``RequestOutput.index``) apart,
        #: and the request is done once all have finished.
        self.num_choices = num_choices
        #: The final output of each finished choice (non-streaming requests).
        self.finals: list[RequestOutput] = []
        #: Non-streaming requests: each choice's ``new_logprobs`` gathered over its outputs (the
        #: final output holds only its own step's), and the prompt's (from whichever output has them).
        self.logprobs: dict[int, list[Any]] = {}
        self.prompt_logprobs: list[Any] | None = None
        #: A small integer naming the request on the wire to an engine process.
        self.key = key
        self.num_prompt_tokens = num_prompt_tokens
        self.queue: asyncio.Queue[RequestOutput | BaseException] | None = asyncio.Queue() if stream else None
        self.future: asyncio.Future[list[RequestOutput]] | None = None if stream else loop.create_future()
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.done = False


class EngineClient:
    """The event-loop side of an engine, whatever runs it: admission, per-request routing of
    outputs, latency histograms. Subclasses move commands to the engine and outputs back
    (:class:`AsyncEngine`: a thread of this process; ``EngineProcess``: a process of its own).
    Everything public is called from the event loop."""

    def __init__(self, *, max_num_seqs: int, max_queued_requests: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self._requests: dict[str, RequestHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        #: Set once the engine has died (and cleared by a restart); the supervisor waits on it.
        self.died = asyncio.Event()
        #: Once set (graceful shutdown), new requests are refused with ``ServerShuttingDownError``.
        self.draining = False
        #: ``time.monotonic()`` of the engine's last sign of progress (a finished step), or of the
        #: request that ended an idle spell; the hang watchdog compares against it.
        self.last_progress = time.monotonic()
        if metrics is not None:
            metrics.attach(lambda: self.snapshot, lambda: self.engine_pid)

    # -- what a transport provides ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    @property
    def is_alive(self) -> bool:
        raise NotImplementedError

    @property
    def engine_pid(self) -> int | None:
        """The engine's own process, if it has one (for its resident-memory gauge)."""
        return None

    @property
    def can_restart(self) -> bool:
        """Whether :meth:`restart` can bring a dead engine back."""
        return False

    async def restart(self, timeout: float | None = None) -> None:
        """Replace the dead engine with a fresh one, without blocking the event loop."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart its engine")

    def kill(self, reason: str) -> None:
        """End an engine that stopped making progress: mark it dead and stop it as hard as the
        transport allows."""
        raise NotImplementedError

    def _send_add(self, handle: RequestHandle, prompt_token_ids: list[int], params: SamplingParams,
                  cache_salt: str | None) -> None:
        raise NotImplementedError

    def _send_abort(self, handle: RequestHandle) -> None:
        raise NotImplementedError

    def _forget(self, handle: RequestHandle) -> None:
        self._requests.pop(handle.request_id, None)

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    # -- requests (event loop) -------------------------------------------------------------

    def check_capacity(self, num_new: int = 1) -> None:
        """Raise if ``num_new`` more requests cannot be admitted now."""
        if self.draining:
            raise ServerShuttingDownError("the server is shutting down; retry on another instance")
        if not self.is_alive:
            # The cause is in the log; clients only learn that it is down and may come back.
            raise EngineDeadError("the engine is not running; retry later")
        if self.max_queued_requests is not None:
            waiting = len(self._requests) + num_new - self.max_num_seqs
            if waiting > self.max_queued_requests:
                raise QueueFullError(f"the server is at capacity: {len(self._requests)} requests in "
                                     f"flight, at most {self.max_num_seqs} running plus "
                                     f"{self.max_queued_requests} queued; retry later")

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            stream: bool, cache_salt: str | None = None) -> RequestHandle:
        """Admit a request (``check_capacity`` first); its outputs go to the returned handle."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        assert self._loop is not None, "start() the engine loop first"
        handle = RequestHandle(request_id, stream, self._loop, num_prompt_tokens=len(prompt_token_ids),
                               num_choices=params.n)
        if not self._requests:  # an idle engine owes no progress: the hang clock starts now
            self.last_progress = handle.arrival
        self._requests[request_id] = handle
        self._send_add(handle, prompt_token_ids, params, cache_salt)
        return handle

    def abort(self, request_id: str) -> None:
        handle = self._requests.get(request_id)
        if handle is None:
            return
        self._forget(handle)
        handle.done = True
        self._send_abort(handle)
        if self.metrics is not None:
            self.metrics.finished("abort")

    async def stream(self, handle: RequestHandle) -> AsyncIterator[list[RequestOutput]]:
        """Yield the outputs of a streaming request, batched: everything that arrived since the
        last yield, so a slow client receives fewer, larger chunks. Aborts the request if the
        consumer stops early (client disconnect, cancellation)."""
        q = handle.queue
        assert q is not None, "not a streaming request"
        num_finished = 0
        try:
            while True:
                item = await q.get()
                batch = [item]
                while not q.empty():
                    batch.append(q.get_nowait())
                for it in batch:
                    if isinstance(it, BaseException):
                        raise it
                yield batch  # type: ignore[misc]
                num_finished += sum(1 for it in batch if it.finished)  # type: ignore[union-attr]
                if num_finished >= handle.num_choices:
                    return
        finally:
            if not handle.done:
                self.abort(handle.request_id)

    async def results(self, handle: RequestHandle) -> list[RequestOutput]:
        """The final output of each choice of a non-streaming request, by ``index``; aborts it
        if cancelled."""
        assert handle.future is not None, "a streaming request"
        try:
            return await handle.future
        finally:
            if not handle.done:
                self.abort(handle.request_id)

    async def result(self, handle: RequestHandle) -> RequestOutput:
        """The final output of a request of one choice."""
        return (await self.results(handle))[0]

    # -- routing outputs (event loop) ------------------------------------------------------

    def _deliver(self, handle: RequestHandle, out: RequestOutput, t: float) -> None:
        """Hand one output (its token produced at ``t``, monotonic) to its request."""
        m = self.metrics
        if m is not None:
            if handle.last_token_time is None:
                m.ttft.observe(t - handle.arrival)
            else:
                m.itl.observe(t - handle.last_token_time)
        handle.last_token_time = t
        all_done = False
        if handle.queue is None:
            if out.new_logprobs:
                handle.logprobs.setdefault(out.index, []).extend(out.new_logprobs)
            if out.prompt_logprobs is not None:
                handle.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            handle.finals.append(out)
            all_done = len(handle.finals) >= handle.num_choices
        if all_done:
            self._forget(handle)
            handle.done = True
            if m is not None:
                m.e2e.observe(t - handle.arrival)
                m.finished(out.finish_reason)
        if handle.queue is not None:
            handle.queue.put_nowait(out)
            if all_done:
                handle.finals.clear()  # a stream's consumer has them already
        elif all_done and not handle.future.done():  # type: ignore[union-attr]
            handle.future.set_result(sorted(handle.finals, key=lambda o: o.index))  # type: ignore[union-attr]

    def _fail(self, handle: RequestHandle, exc: BaseException) -> None:
        if handle.done:
            return
        self._forget(handle)
        handle.done = True
        if handle.queue is not None:
            handle.queue.put_nowait(exc)
        elif not handle.future.done():  # type: ignore[union-attr]
            handle.future.set_exception(exc)  # type: ignore[union-attr]

    def _fail_all(self, exc: BaseException) -> None:
        for handle in list(self._requests.values()):
            self._fail(handle, exc)

    def _engine_failed(self, handle: RequestHandle, message: str) -> None:
        """The engine failed this request only (``RequestOutput.error``)."""
        logger.error("the engine failed request %s: %s", handle.request_id, message)
        if self.metrics is not None and not handle.done:
            self.metrics.finished("error")
        self._fail(handle, EngineRequestError(f"the engine failed this request: {message}"))

    def _mark_dead(self, reason: str) -> None:
        """The engine is gone: fail what is in flight, stop reporting its load, wake the
        supervisor. Event loop only."""
        if self.died.is_set():
            return
        if self.error is None:
            self.error = EngineDeadError(reason)
        self.snapshot = self.snapshot.down()
        logger.error("%s; /health answers 503 while the engine is down", reason)
        self._fail_all(EngineDeadError(f"{reason}; the request was not completed"))
        self.died.set()

    # -- graceful shutdown (event loop) ----------------------------------------------------

    def begin_drain(self) -> None:
        """Admit nothing new; what is in flight runs on."""
        self.draining = True

    def end_remaining(self) -> int:
        """End every request still in flight (the shutdown deadline passed); how many."""
        handles = list(self._requests.values())
        for handle in handles:
            self._fail(handle, ServerShuttingDownError(
                "the server is shutting down and ended this request before it finished"))
            self._send_abort(handle)
            if self.metrics is not None:
                self.metrics.finished("abort")
        return len(handles)


_STOP = object()


class AsyncEngine(EngineClient):
    """The engine in a background thread of this process (``--engine-in-process``).

    Simple, and what tests with a scripted engine use; but the thread competes with the event
    loop for the GIL, which costs time per token under many streams (``EngineProcess`` does not).
    """

    def __init__(self, engine: EngineLike, *, max_num_seqs: int, max_queued_requests: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_stats_time = 0.0
        super().__init__(max_num_seqs=max_num_seqs, max_queued_requests=max_queued_requests,
                         metrics=metrics)
        self.snapshot = self._take_snapshot()

    # -- lifecycle (event loop) ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        assert self._thread is None, "the engine loop is already running"
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sagellm-engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _send_add(self, handle: RequestHandle, prompt_token_ids: list[int], params: SamplingParams,
                  cache_salt: str | None) -> None:
        self._commands.put(("add", handle.request_id, prompt_token_ids, params, cache_salt))

    def _send_abort(self, handle: RequestHandle) -> None:
        self._commands.put(("abort", handle.request_id))

    # -- routing outputs (event loop) ------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        requests = self._requests
        now = time.monotonic()
        for out in outputs:
            handle = requests.get(out.request_id)
            if handle is None:
                continue  # aborted on this side; the abort command is on its way
            error = getattr(out, "error", None) if out.finished else None
            if error:
                self._engine_failed(handle, str(error))
                continue
            m = out.metrics
            self._deliver(handle, out, m.last_token_time if m is not None and
                          m.last_token_time is not None else now)

    def _refused(self, request_id: str, exc: BaseException) -> None:
        handle = self._requests.get(request_id)
        if handle is not None:
            self._fail(handle, exc)

    def kill(self, reason: str) -> None:
        # A thread cannot be stopped: the stuck step keeps its thread, but nothing waits on it any
        # more, and the supervisor's policy decides what becomes of the server.
        self._mark_dead(reason)

    def _on_loop_death(self, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self._mark_dead(f"the engine loop raised {detail}")

    # -- the engine loop (its own thread) --------------------------------------------------

    def _take_snapshot(self) -> EngineSnapshot:
        return EngineSnapshot.from_wire(self.engine.get_stats().to_wire(),
                                        alive=self._thread is None or self.error is None)

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, cache_salt = cmd
            try:
                self.engine.add_request(ids, params, rid, cache_salt=cache_salt)
            except Exception as exc:  # validation the server missed: fail this request only
                self._loop.call_soon_threadsafe(self._refused, rid, exc)  # type: ignore[union-attr]
        else:
            self.engine.abort_request(cmd[1])

    def _run(self) -> None:
        engine = self.engine
        commands = self._commands
        loop = self._loop
        assert loop is not None
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self.snapshot = self._take_snapshot()
                    cmd = commands.get()
                    if cmd is _STOP:
                        return
                    self._apply(cmd)  # type: ignore[arg-type]
                while not commands.empty():
                    cmd = commands.get_nowait()
                    if cmd is _STOP:
                        return
                    self._apply(cmd)  # type: ignore[arg-type]
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                now = self.last_progress = time.monotonic()
                if outputs:
                    loop.call_soon_threadsafe(self._dispatch, outputs)
                if now - self._last_stats_time >= STATS_INTERVAL:
                    self._last_stats_time = now
                    self.snapshot = self._take_snapshot()
        except BaseException as exc:
            self.error = exc
            logger.exception("the engine loop died")
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._on_loop_death, exc)
