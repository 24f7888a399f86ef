"""The server's side of the engine process (``sagellm_server.engine_core``, where the wire format is
documented): it starts the child, feeds it requests, routes its outputs, notices its death and
starts a new one when asked.

With the engine in a thread of the server process, the event loop's per-token work for many
streams (routing outputs, building SSE chunks, writing sockets) and the engine's step compete for
one interpreter lock; in a child started with ``multiprocessing``'s ``spawn`` context (safe with
CUDA) they do not. The event loop reads the output pipe with ``add_reader`` and writes commands
without blocking; no thread of this process touches the engine's traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from sagellm.config import EngineConfig
from sagellm.outputs import RequestMetrics
from sagellm.sampling_params import SamplingParams
from sagellm_server.async_engine import (
    EngineClient,
    EngineDeadError,
    EngineRequestError,
    EngineSnapshot,
    RequestHandle,
)
from sagellm_server.engine_core import (
    ENGINE_ERROR,
    EngineInfo,
    EngineStartupError,
    build_engine,
    decode_logprobs,
    describe_engine,
    engine_process_main,
    loads,
)
from sagellm_server.engine_core import frame as _frame
from sagellm_server.frames import FrameReader, read_available
from sagellm_server.metrics import ServerMetrics

__all__ = ["EngineInfo", "EngineProcess", "EngineStartupError", "build_engine", "describe_engine"]

logger = logging.getLogger("sagellm.server")


class WireOutput:
    """One output as the parent receives it: the parts of ``RequestOutput`` the server reads.

    ``text`` and ``token_ids`` (everything generated) and ``metrics`` are filled on the final
    output only; streaming consumers read ``new_text`` and ``new_token_ids``."""

    __slots__ = ("request_id", "new_token_ids", "new_text", "num_output_tokens", "num_prompt_tokens",
                 "finished", "finish_reason", "stop_reason", "text", "token_ids", "metrics",
                 "num_preemptions", "prompt", "index", "new_logprobs", "prompt_logprobs")

    def __init__(self, request_id: str, item: list[Any], num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.new_token_ids: list[int] = item[1]
        self.new_text: str = item[2]
        self.num_output_tokens: int = item[3]
        self.index: int = item[4]
        self.new_logprobs = decode_logprobs(item[5])
        self.prompt_logprobs = decode_logprobs(item[6])
        self.prompt = None
        if len(item) > 7:
            self.finished = True
            (self.finish_reason, self.stop_reason, self.text, self.token_ids,
             self.num_prompt_tokens, times, self.num_preemptions) = item[7:]
            self.metrics = RequestMetrics(*times) if times is not None else None
        else:
            self.finished = False
            self.finish_reason = self.stop_reason = None
            self.text = ""
            self.token_ids: list[int] = []
            self.num_prompt_tokens = num_prompt_tokens
            self.metrics: RequestMetrics | None = None
            self.num_preemptions = 0


def _snapshot(stats: dict[str, Any]) -> EngineSnapshot:
    return EngineSnapshot.from_wire(stats)


class _Child:
    """One engine process and the parent's ends of its pipes."""

    def __init__(self, proc: Any, commands: Connection, outputs: Connection, lifeline: Connection) -> None:
        self.proc = proc
        self.commands = commands
        self.outputs = outputs
        self.lifeline = lifeline
        self.info: EngineInfo | None = None

    def close_pipes(self) -> None:
        for conn in (self.commands, self.outputs, self.lifeline):
            with contextlib.suppress(OSError):
                conn.close()


def _spawn(config_json: str, factory: str | None, timeout: float | None) -> _Child:
    """Start an engine process and wait until it has built the engine (blocking: the parent calls
    it before serving, and from an executor thread to restart). Raises :class:`EngineStartupError`
    with the child's error type and message if it cannot."""
    ctx = multiprocessing.get_context("spawn")
    cmd_r, cmd_w = ctx.Pipe(duplex=False)
    out_r, out_w = ctx.Pipe(duplex=False)
    life_r, life_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=engine_process_main, name="sagellm-engine-core", daemon=False,
                       args=(config_json, cmd_r, out_w, life_r, factory, logging.getLogger().level))
    proc.start()
    for end in (cmd_r, out_w, life_r):  # the child's ends: EOF must mean "the other side died"
        end.close()
    child = _Child(proc, cmd_w, out_r, life_w)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not out_r.poll(0.2):
            if not proc.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise EngineStartupError("TimeoutError", f"the engine did not start within {timeout} s")
        try:
            msg = loads(out_r.recv_bytes())  # blocking is fine here: no event loop reads it yet
        except (EOFError, OSError):
            proc.join(5)
            raise EngineStartupError("EngineDeadError", "the engine process exited while starting "
                                     f"({_describe_exit(proc.exitcode)})") from None
        if msg[0] == "fail":
            raise EngineStartupError(msg[1], msg[2])
        assert msg[0] == "ready", msg
    except EngineStartupError as exc:
        _stop_child(child, 10.0)
        exc.exitcode = proc.exitcode
        raise
    except BaseException:
        _stop_child(child, 10.0)
        raise
    info = dict(msg[1])
    info["eos_token_ids"] = tuple(info.get("eos_token_ids", ()))  # a list after the pipe's JSON
    child.info = EngineInfo(**info)
    return child


def _stop_child(child: _Child, timeout: float) -> None:
    """Close our ends (the child exits on EOF), join it, and end it hard if it lingers (blocking)."""
    proc = child.proc
    with contextlib.suppress(OSError):
        child.commands.close()
    proc.join(timeout)
    if proc.is_alive():
        logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    child.close_pipes()


#: How long a dead engine process may take to exit by itself before it gets SIGKILL.
REAP_GRACE_S = 10.0
_REAP_POLL_S = 0.02


class EngineProcess(EngineClient):
    """The parent side: starts the engine process, feeds it requests, routes its outputs.

    :meth:`launch` (blocking, before the event loop runs) starts the child and waits until it is
    ready; :meth:`start` attaches the output pipe to the event loop with ``add_reader``, so no
    thread of this process ever touches the engine's traffic. The engine counts as dead only when
    its process has exited (EOF on the output pipe, then reaped), when it says so (``dead``), or
    when the hang watchdog kills it; :meth:`restart` then starts a new one from an executor
    thread, once the old one is reaped (its device memory must be free first)."""

    def __init__(self, config: EngineConfig, *, max_num_seqs: int | None = None,
                 max_queued_requests: int | None = None, metrics: ServerMetrics | None = None,
                 factory: str | None = None) -> None:
        self.config = config
        self.factory = factory
        self.info: EngineInfo | None = None
        self._child: _Child | None = None
        self._attached = False
        self._reader = FrameReader()
        self._by_key: dict[int, RequestHandle] = {}
        self._next_key = 0
        self._wbuf = bytearray()
        self._writing = False
        self._stopped = False
        # Last: registering the metrics collector already reads is_alive.
        super().__init__(max_num_seqs=max_num_seqs or config.max_num_seqs,
                         max_queued_requests=max_queued_requests, metrics=metrics)
        #: Counters of the engines before the last restart, added to the live ones.
        self._carried = EngineSnapshot()
        #: Set while no dead child is left to reap.
        self._reaped = asyncio.Event()
        self._reaped.set()
        self._spawning: concurrent.futures.Future[_Child] | None = None

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    @property
    def engine_pid(self) -> int | None:
        return self.pid if self.is_alive else None

    @property
    def _proc(self) -> Any:
        return self._child.proc if self._child is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    def launch(self, timeout: float | None = None) -> EngineInfo:
        """Start the engine process and wait until it has built the engine (blocking).

        Raises :class:`EngineStartupError` if it cannot (the child's error type and message)."""
        assert self._child is None, "the engine process is already started"
        child = _spawn(self.config.model_dump_json(), self.factory, timeout)
        self._install(child)
        assert self.info is not None
        return self.info

    def _install(self, child: _Child) -> None:
        assert child.info is not None
        self._child = child
        self.info = child.info
        self._reader = FrameReader()
        self._wbuf.clear()
        logger.info("engine process pid %d ready in %.1f s", child.proc.pid, child.info.startup_seconds)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        assert self._child is not None, "launch() the engine process first"
        self._loop = loop or asyncio.get_running_loop()
        self._attach()

    def _attach(self) -> None:
        child = self._child
        assert child is not None and self._loop is not None
        # Both ends non-blocking on purpose: writes are buffered, reads take what is there.
        os.set_blocking(child.commands.fileno(), False)
        os.set_blocking(child.outputs.fileno(), False)
        self._loop.add_reader(child.outputs.fileno(), self._on_readable)
        self._attached = True
        self.last_progress = time.monotonic()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._detach()
        spawning = self._spawning
        if spawning is not None:  # a restart is starting an engine: stop that one too
            with contextlib.suppress(Exception):
                _stop_child(spawning.result(timeout), timeout)
        child = self._child
        if child is None:
            return
        if self.error is None and not self._wbuf:
            with contextlib.suppress(OSError):  # a full pipe or a dead child: closing it says the same
                os.write(child.commands.fileno(), _frame(["stop"]))
        _stop_child(child, timeout)

    def _detach(self) -> None:
        loop, child = self._loop, self._child
        if self._attached and child is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, OSError):  # the fd may be closed already
                loop.remove_reader(child.outputs.fileno())
                if self._writing:
                    loop.remove_writer(child.commands.fileno())
        self._attached = False
        self._writing = False

    @property
    def is_alive(self) -> bool:
        child = self._child
        return (child is not None and self.error is None and not self._stopped
                and child.proc.exitcode is None)

    @property
    def can_restart(self) -> bool:
        return not self._stopped

    async def restart(self, timeout: float | None = None) -> None:
        """Start a new engine process in place of the dead one. The new engine must serve the same
        context length and vocabulary (the HTTP side validates requests against them)."""
        assert self.error is not None, "the engine is not dead"
        loop = self._loop
        assert loop is not None
        await self._reaped.wait()
        fut: concurrent.futures.Future[_Child] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()  # it cannot be cancelled: shutdown() must stop the child
        config_json = self.config.model_dump_json()

        def spawn() -> None:
            try:
                fut.set_result(_spawn(config_json, self.factory, timeout))
            except BaseException as exc:
                fut.set_exception(exc)

        self._spawning = fut
        threading.Thread(target=spawn, name="sagellm-engine-restart", daemon=True).start()
        try:
            # Shielded: if the supervisor is cancelled meanwhile, _spawning stays set and
            # shutdown() stops the engine this start produces.
            child = await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._spawning = None
            raise
        self._spawning = None
        old, new = self.info, child.info
        assert old is not None and new is not None
        if self._stopped or (new.max_model_len, new.vocab_size) != (old.max_model_len, old.vocab_size):
            await loop.run_in_executor(None, _stop_child, child, 10.0)
            if self._stopped:
                raise EngineDeadError("the server shut down while the engine restarted")
            raise EngineStartupError("EngineMismatch", (
                f"the restarted engine serves max_model_len {new.max_model_len} and vocab_size "
                f"{new.vocab_size}, not {old.max_model_len} and {old.vocab_size}"))
        self._install(child)
        self.error = None
        self.snapshot = EngineSnapshot().plus_counters(self._carried)
        self.died.clear()
        self._attach()

    def kill(self, reason: str) -> None:
        child = self._child
        if child is None or self.died.is_set():
            return
        with contextlib.suppress(OSError):
            child.proc.kill()
        self._die(child, reason)

    # -- commands (event loop) -------------------------------------------------------------

    def _send_add(self, handle: RequestHandle, prompt_token_ids: list[int], params: SamplingParams,
                  cache_salt: str | None) -> None:
        self._next_key += 1
        handle.key = key = self._next_key
        self._by_key[key] = handle
        self._send(["add", key, handle.request_id, prompt_token_ids, params.model_dump(), cache_salt])

    def _send_abort(self, handle: RequestHandle) -> None:
        self._send(["abort", handle.key])

    def _forget(self, handle: RequestHandle) -> None:
        self._requests.pop(handle.request_id, None)
        self._by_key.pop(handle.key, None)

    def _send(self, msg: list[Any]) -> None:
        if not self._attached:
            return  # dead or stopping: nothing reads commands any more
        frame = _frame(msg)
        if self._wbuf:
            self._wbuf += frame
            return
        try:
            self._write_now(frame)
        except OSError:
            return  # the child is gone; the output pipe's EOF reports it

    def _write_now(self, frame: bytes) -> None:
        """Write without blocking; keep the rest and finish when the pipe has room."""
        assert self._child is not None
        fd = self._child.commands.fileno()
        try:
            n = os.write(fd, frame)
        except BlockingIOError:
            n = 0
        if n < len(frame):
            self._wbuf += frame[n:]
            if not self._writing and self._loop is not None:
                self._writing = True
                self._loop.add_writer(fd, self._flush)

    def _flush(self) -> None:
        if not self._attached or self._child is None:
            return
        fd = self._child.commands.fileno()
        try:
            n = os.write(fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._wbuf)  # the child is gone; the output pipe's EOF reports it
        del self._wbuf[:n]
        if not self._wbuf:
            self._writing = False
            self._loop.remove_writer(fd)  # type: ignore[union-attr]

    # -- outputs (event loop) --------------------------------------------------------------

    def _on_readable(self) -> None:
        child = self._child
        if child is None or not self._attached:
            return
        try:
            data, eof = read_available(child.outputs.fileno())
        except OSError as exc:  # not EAGAIN (read_available handles that): the pipe itself failed
            logger.error("reading the engine's output pipe failed: %r", exc)
            data, eof = b"", True
        if data:
            try:
                frames = self._reader.feed(data)
            except ValueError:
                logger.exception("the engine's output stream is corrupt")
                self.kill("the engine's output stream is corrupt")
                return
            for raw in frames:
                self._handle_frame(raw)
                if self._child is not child or self.died.is_set():
                    return  # it died (a "dead" message); the rest is moot
        if eof:
            self._on_eof(child)

    def _handle_frame(self, raw: bytes) -> None:
        self.last_progress = time.monotonic()
        msg: Any = None
        try:
            msg = loads(raw)
            self._handle(msg)
        except Exception:
            # A bug on this side, not the engine's death: fail only the requests it touched.
            logger.exception("handling a message from the engine process failed")
            for key in _keys_of(msg):
                handle = self._by_key.get(key)
                if handle is not None:
                    self._fail(handle, EngineRequestError("the server could not handle the engine's "
                                                          "output for this request"))
                    self._send_abort(handle)

    def _handle(self, msg: list[Any]) -> None:
        op = msg[0]
        if op == "out":
            t, items, stats = msg[1], msg[2], msg[3]
            by_key = self._by_key
            for item in items:
                handle = by_key.get(item[0])
                if handle is None:
                    continue  # aborted on this side; the abort command is on its way
                self._deliver(handle, WireOutput(handle.request_id, item, handle.num_prompt_tokens), t)
            if stats is not None:
                self.snapshot = _snapshot(stats).plus_counters(self._carried)
        elif op == "stats":
            self.snapshot = _snapshot(msg[1]).plus_counters(self._carried)
        elif op == "err":
            handle = self._by_key.get(msg[1])
            if handle is not None:
                kind, text = msg[2], msg[3]
                if kind == "ValueError":  # add_request refused it: the client's fault (400)
                    self._fail(handle, ValueError(text))
                else:
                    self._engine_failed(handle, text if kind == ENGINE_ERROR else f"{kind}: {text}")
        elif op == "dead":
            assert self._child is not None
            self._die(self._child, f"the engine raised {msg[2]}")
        else:
            logger.warning("unknown message from the engine process: %r", op)

    def _on_eof(self, child: _Child) -> None:
        """The child closed its output pipe: it is exiting. Wait (without blocking) until it has,
        so its exit status names the cause, then it is dead."""
        self._detach()
        if self.died.is_set():
            return
        self._reaped.clear()

        def gone(exitcode: int | None) -> None:
            self._die(child, f"the engine process exited ({_describe_exit(exitcode)})")

        self._reap(child, gone)

    def _die(self, child: _Child, reason: str) -> None:
        if self.died.is_set():
            return
        self._detach()
        self._carried = self.snapshot.down()
        self._mark_dead(reason)
        if self._reaped.is_set() and child.proc.exitcode is None:
            self._reaped.clear()
            self._reap(child, None)
        elif child.proc.exitcode is not None:
            child.close_pipes()

    def _reap(self, child: _Child, then: Callable[[int | None], None] | None) -> None:
        """Poll (from the event loop, never blocking it) until ``child`` has exited and is
        reaped (no zombie); SIGKILL it after ``REAP_GRACE_S``. Then close its pipes, set
        ``_reaped`` and call ``then`` with its exit code."""
        loop = self._loop
        assert loop is not None
        deadline = time.monotonic() + REAP_GRACE_S

        def check() -> None:
            nonlocal deadline
            code = child.proc.exitcode  # waitpid(WNOHANG): reaps it once it has exited
            if code is None:
                if time.monotonic() > deadline:
                    logger.warning("the engine process %d did not exit within %.0f s; killing it",
                                   child.proc.pid, REAP_GRACE_S)
                    with contextlib.suppress(OSError):
                        child.proc.kill()
                    deadline = float("inf")
                if not loop.is_closed():
                    loop.call_later(_REAP_POLL_S, check)
                return
            child.close_pipes()
            self._reaped.set()
            if then is not None:
                then(code)

        check()


def _keys_of(msg: Any) -> list[int]:
    """The request keys a child message is about (to fail just those if handling it fails)."""
    if isinstance(msg, list) and msg:
        if msg[0] == "out" and len(msg) > 2 and isinstance(msg[2], list):
            return [item[0] for item in msg[2] if isinstance(item, list) and item]
        if msg[0] == "err" and len(msg) > 1:
            return [msg[1]]
    return []


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
