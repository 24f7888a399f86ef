"""The engine in a process of its own (the "engine core"), so HTTP work never waits for its GIL.

With the engine in a thread of the server process, the event loop's per-token work for many
streams (routing outputs, building SSE chunks, writing sockets) and the engine's step compete for
one interpreter lock. Here the engine runs in a child started with ``multiprocessing``'s
``spawn`` context (safe with CUDA); the two sides talk over two pipes in a small JSON format, and
nothing is ever unpickled from them. The child builds ``LLMEngine`` from the ``EngineConfig`` JSON
it is given, reports ready, then loops: read commands (blocking only when idle), step, send that
step's outputs in one message.

Wire format: every message is one JSON array, framed as ``multiprocessing.connection`` frames
(a 4-byte big-endian length, then the bytes), so the child reads and writes with
``Connection.recv_bytes``/``send_bytes`` and the parent writes without blocking the event loop.

Parent to child (commands)::

    ["add", key, request_id, prompt_token_ids, sampling_params_dict]
    ["abort", key]
    ["stop"]                                 (closing the pipe means the same)

``key`` is a small integer the parent gives each request, shorter on the wire than its id.

Child to parent::

    ["ready", info]                          EngineInfo fields, once, after the engine is built
    ["fail", error_type, message]            building the engine failed; the child exits
    ["out", t, [output, ...], stats | null]  one step's outputs; t: the step's time.monotonic()
    ["stats", stats]                         sent when the engine goes idle (fresh after aborts)
    ["err", key, error_type, message]        the engine refused this request (only this one)
    ["dead", error_type, message]            the engine loop raised; the child exits

    output, running:  [key, new_token_ids, new_text, num_output_tokens]
    output, finished: [key, new_token_ids, new_text, num_output_tokens, finish_reason, stop_reason,
                       text, token_ids, num_prompt_tokens,
                       [arrival, first_scheduled, first_token, last_token, finished_time] | null,
                       num_preemptions]
    stats: [num_running, num_waiting, kv_usage, num_kv_blocks, num_free_kv_blocks,
            num_prompt_tokens, num_generation_tokens, num_preemptions, num_steps]

Times are ``time.monotonic()`` of the child: CLOCK_MONOTONIC is one clock for the whole machine on
Linux, so the parent compares them with its own arrival times. ``LLMEngine`` stamps every output
of a step with the same time, so it travels once per message, and the full metrics only with the
last output. Stats ride on an ``out`` message at most every ``STATS_INTERVAL`` seconds while busy.

Lifetime: the child ignores SIGINT (the parent decides when it stops) and exits when the command
pipe closes; a thread also watches a "lifeline" pipe that only the parent holds, so even an engine
stuck in a step goes away (after ``LIFELINE_GRACE_S``) when the parent dies. The child is not
daemonic, because a tensor-parallel engine starts worker processes of its own, which
``multiprocessing`` forbids daemonic processes; the parent therefore always stops and joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from sagellm.config import EngineConfig
from sagellm.outputs import RequestMetrics
from sagellm.sampling_params import SamplingParams
from sagellm_server.async_engine import (
    STATS_INTERVAL,
    EngineClient,
    EngineDeadError,
    EngineLike,
    EngineSnapshot,
    RequestHandle,
)
from sagellm_server.metrics import ServerMetrics

logger = logging.getLogger("sagellm.server")

#: How long an orphaned engine process may take to stop by itself before it is ended hard.
LIFELINE_GRACE_S = 5.0

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _frame(msg: list[Any]) -> bytes:
    data = _dumps(msg).encode()
    return struct.pack("!i", len(data)) + data


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know about the engine it serves (sent in the ready message)."""

    max_model_len: int
    vocab_size: int
    model: str
    #: Where the server loads its own copy of the tokenizer from; None: token ids only.
    tokenizer: str | None
    backend: str
    device_name: str
    num_kv_blocks: int
    block_size: int
    startup_seconds: float
    pid: int


def describe_engine(engine: Any) -> EngineInfo:
    """An :class:`EngineInfo` for ``engine`` (an ``LLMEngine``, or a test double with fewer parts)."""
    cfg = getattr(engine, "config", None)
    loaded = getattr(engine, "loaded", None)
    platform = getattr(engine, "platform", None)
    tokenizer = None
    if getattr(engine, "tokenizer", None) is not None:
        tokenizer = str(cfg.tokenizer) if cfg is not None and cfg.tokenizer else str(loaded.model_dir)  # type: ignore[union-attr]
    kv = getattr(engine, "kv", None)
    return EngineInfo(
        max_model_len=int(engine.max_model_len), vocab_size=int(engine.vocab_size),
        model=str(loaded.source) if loaded is not None else str(getattr(cfg, "model", "") or ""),
        tokenizer=tokenizer,
        backend=platform.name if platform is not None else "",
        device_name=platform.device_name() if platform is not None else "",
        num_kv_blocks=int(kv.num_blocks) if kv is not None else 0,
        block_size=int(cfg.block_size) if cfg is not None else 0,
        startup_seconds=float(getattr(engine, "startup_seconds", 0.0)),
        pid=os.getpid())


class EngineStartupError(RuntimeError):
    """The engine process could not build the engine; ``error_type`` names the child's exception."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# ============================================================================================
# Child side
# ============================================================================================


def _stats(engine: EngineLike) -> list[Any]:
    s = engine.get_stats()
    return [s.num_running, s.num_waiting, s.kv_usage, s.num_kv_blocks, s.num_free_kv_blocks,
            s.num_prompt_tokens, s.num_generation_tokens, s.num_preemptions, s.num_steps]


class EngineCore:
    """The child's loop around one engine."""

    def __init__(self, engine: EngineLike, commands: Connection, outputs: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.keys: dict[str, int] = {}  # request id -> key
        self.ids: dict[int, str] = {}  # key -> request id
        self.last_stats: list[Any] | None = None
        self.last_stats_time = 0.0

    def send(self, msg: list[Any]) -> None:
        self.outputs.send_bytes(_dumps(msg).encode())

    def apply(self, raw: bytes) -> bool:
        """Carry out one command; False on ``stop``."""
        msg = _loads(raw)
        op = msg[0]
        if op == "add":
            _, key, rid, ids, params = msg
            try:
                self.engine.add_request(ids, SamplingParams.model_validate(params), rid)
            except Exception as exc:  # validation the server missed: fail this request only
                self.send(["err", key, type(exc).__name__, str(exc)])
                return True
            self.keys[rid] = key
            self.ids[key] = rid
        elif op == "abort":
            rid = self.ids.pop(msg[1], None)
            if rid is not None:
                del self.keys[rid]
                self.engine.abort_request(rid)
        elif op == "stop":
            return False
        else:
            raise ValueError(f"unknown engine command {op!r}")
        return True

    def send_stats_if_changed(self) -> None:
        stats = _stats(self.engine)
        if stats != self.last_stats:
            self.last_stats = stats
            self.last_stats_time = time.monotonic()
            self.send(["stats", stats])

    def encode(self, outputs: list[Any]) -> tuple[float, list[list[Any]]]:
        keys, ids = self.keys, self.ids
        items: list[list[Any]] = []
        t = 0.0
        for o in outputs:
            key = keys.get(o.request_id)
            if key is None:
                continue  # aborted by the parent while this step ran
            m = o.metrics
            if m is not None and m.last_token_time is not None:
                t = m.last_token_time
            if o.finished:
                del keys[o.request_id], ids[key]
                times = None if m is None else [m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                                m.last_token_time, m.finished_time]
                items.append([key, o.new_token_ids, o.new_text, o.num_output_tokens, o.finish_reason,
                              o.stop_reason, o.text, o.token_ids, o.num_prompt_tokens, times,
                              o.num_preemptions])
            else:
                items.append([key, o.new_token_ids, o.new_text, o.num_output_tokens])
        return t or time.monotonic(), items

    def run(self) -> None:
        """Serve until ``stop`` or the parent goes away (EOF on the command pipe)."""
        engine, commands = self.engine, self.commands
        while True:
            if not engine.has_unfinished_requests():
                self.send_stats_if_changed()
                if not self.apply(commands.recv_bytes()):  # idle: block
                    return
            while commands.poll():
                if not self.apply(commands.recv_bytes()):
                    return
            if not engine.has_unfinished_requests():
                continue
            outputs = engine.step()
            now = time.monotonic()
            stats = None
            if now - self.last_stats_time >= STATS_INTERVAL:
                stats = self.last_stats = _stats(engine)
                self.last_stats_time = now
            if outputs or stats is not None:
                t, items = self.encode(outputs)
                self.send(["out", t, items, stats])


def _watch_lifeline(lifeline: Connection) -> None:
    """End this process if the parent dies, even while a step is stuck."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                lifeline.recv_bytes()
        time.sleep(LIFELINE_GRACE_S)
        os._exit(3)

    threading.Thread(target=watch, name="sagellm-engine-lifeline", daemon=True).start()


def _serve(core: EngineCore, result: list[int]) -> None:
    try:
        core.run()
        result.append(0)
    except (EOFError, BrokenPipeError):
        logger.info("the command pipe closed; the engine stops")
        result.append(0)
    except BaseException as exc:
        logger.exception("the engine loop died")
        result.append(1)
        with contextlib.suppress(OSError):
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            core.outputs.send_bytes(_dumps(["dead", type(exc).__name__, detail]).encode())


def _build_engine(config_json: str, factory: str | None) -> EngineLike:
    config = EngineConfig.model_validate_json(config_json)
    if factory is not None:  # "module:callable", for tests with a scripted engine
        module, _, name = factory.partition(":")
        return getattr(importlib.import_module(module), name)(config)  # type: ignore[no-any-return]
    from sagellm.engine.llm_engine import LLMEngine

    return LLMEngine(config)


def engine_process_main(config_json: str, commands: Connection, outputs: Connection,
                        lifeline: Connection, factory: str | None, log_level: int) -> None:
    """Entry point of the engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level or logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    _watch_lifeline(lifeline)
    code = 0
    engine = None
    try:
        try:
            engine = _build_engine(config_json, factory)
        except BaseException as exc:
            logger.debug("building the engine failed", exc_info=True)
            outputs.send_bytes(_dumps(["fail", type(exc).__name__, str(exc)]).encode())
            code = 2
            return
        outputs.send_bytes(_dumps(["ready", asdict(describe_engine(engine))]).encode())
        core = EngineCore(engine, commands, outputs)
        result: list[int] = []
        # Step from a worker thread, as the in-process engine did: on a loaded CPU-only machine
        # torch's OpenMP pool is far slower driven from the main thread (see bench_overhead.py).
        loop = threading.Thread(target=_serve, args=(core, result), name="sagellm-engine-core")
        loop.start()
        loop.join()
        code = result[0] if result else 1
    finally:
        if engine is not None and hasattr(engine, "shutdown"):
            with contextlib.suppress(Exception):
                engine.shutdown()  # the worker processes of a tensor-parallel engine
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: torch and tokenizers threads can hang a clean exit.
        os._exit(code)


# ============================================================================================
# Parent side
# ============================================================================================


class WireOutput:
    """One output as the parent receives it: the parts of ``RequestOutput`` the server reads.

    ``text`` and ``token_ids`` (everything generated) and ``metrics`` are filled on the final
    output only; streaming consumers read ``new_text`` and ``new_token_ids``."""

    __slots__ = ("request_id", "new_token_ids", "new_text", "num_output_tokens", "num_prompt_tokens",
                 "finished", "finish_reason", "stop_reason", "text", "token_ids", "metrics",
                 "num_preemptions", "prompt")

    def __init__(self, request_id: str, item: list[Any], num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.new_token_ids: list[int] = item[1]
        self.new_text: str = item[2]
        self.num_output_tokens: int = item[3]
        self.prompt = None
        if len(item) > 4:
            self.finished = True
            (self.finish_reason, self.stop_reason, self.text, self.token_ids,
             self.num_prompt_tokens, times, self.num_preemptions) = item[4:]
            self.metrics = RequestMetrics(*times) if times is not None else None
        else:
            self.finished = False
            self.finish_reason = self.stop_reason = None
            self.text = ""
            self.token_ids: list[int] = []
            self.num_prompt_tokens = num_prompt_tokens
            self.metrics: RequestMetrics | None = None
            self.num_preemptions = 0


def _snapshot(s: list[Any]) -> EngineSnapshot:
    return EngineSnapshot(*s)


class EngineProcess(EngineClient):
    """The parent side: starts the engine process, feeds it requests, routes its outputs.

    :meth:`launch` (blocking, before the event loop runs) starts the child and waits until it is
    ready; :meth:`start` attaches the output pipe to the event loop with ``add_reader``, so no
    thread of this process ever touches the engine's traffic."""

    def __init__(self, config: EngineConfig, *, max_num_seqs: int | None = None,
                 max_queued_requests: int | None = None, metrics: ServerMetrics | None = None,
                 factory: str | None = None) -> None:
        super().__init__(max_num_seqs=max_num_seqs or config.max_num_seqs,
                         max_queued_requests=max_queued_requests, metrics=metrics)
        self.config = config
        self.factory = factory
        self.info: EngineInfo | None = None
        self._proc: Any = None
        self._commands: Connection | None = None
        self._outputs: Connection | None = None
        self._lifeline: Connection | None = None
        self._by_key: dict[int, RequestHandle] = {}
        self._next_key = 0
        self._wbuf = bytearray()
        self._writing = False
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    def launch(self, timeout: float | None = None) -> EngineInfo:
        """Start the engine process and wait until it has built the engine (blocking).

        Raises :class:`EngineStartupError` if it cannot (the child's error type and message)."""
        assert self._proc is None, "the engine process is already started"
        ctx = multiprocessing.get_context("spawn")
        cmd_r, cmd_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        life_r, life_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=engine_process_main, name="sagellm-engine-core", daemon=False,
                           args=(self.config.model_dump_json(), cmd_r, out_w, life_r, self.factory,
                                 logging.getLogger().level))
        proc.start()
        for end in (cmd_r, out_w, life_r):  # the child's ends: EOF must mean "the other side died"
            end.close()
        self._proc, self._commands, self._outputs, self._lifeline = proc, cmd_w, out_r, life_w
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not out_r.poll(0.2):
                if not proc.is_alive():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineStartupError("TimeoutError", f"the engine did not start within {timeout} s")
            try:
                msg = _loads(out_r.recv_bytes())
            except (EOFError, OSError):
                proc.join(5)
                raise EngineStartupError("EngineDeadError", "the engine process exited while starting "
                                         f"({_describe_exit(proc.exitcode)})") from None
            if msg[0] == "fail":
                raise EngineStartupError(msg[1], msg[2])
            assert msg[0] == "ready", msg
        except BaseException:
            self._stop_process(10.0)
            raise
        self.info = EngineInfo(**msg[1])
        logger.info("engine process pid %d ready in %.1f s", proc.pid, self.info.startup_seconds)
        return self.info

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        assert self._proc is not None and self._outputs is not None and self._commands is not None, \
            "launch() the engine process first"
        self._loop = loop = loop or asyncio.get_running_loop()
        os.set_blocking(self._commands.fileno(), False)
        loop.add_reader(self._outputs.fileno(), self._on_readable)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        self._detach()
        if self.error is None and not self._wbuf and self._commands is not None:
            with contextlib.suppress(OSError):  # a full pipe or a dead child: closing it says the same
                os.write(self._commands.fileno(), _frame(["stop"]))
        self._stop_process(timeout)

    def _detach(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            if self._outputs is not None:
                loop.remove_reader(self._outputs.fileno())
            if self._writing and self._commands is not None:
                loop.remove_writer(self._commands.fileno())
        self._writing = False

    def _stop_process(self, timeout: float) -> None:
        """Close our ends (the child exits on EOF), join it, and end it hard if it lingers."""
        proc = self._proc
        if self._commands is not None:
            self._commands.close()
            self._commands = None
        proc.join(timeout)
        if proc.is_alive():
            logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in (self._outputs, self._lifeline):
            if conn is not None:
                conn.close()
        self._outputs = self._lifeline = None

    @property
    def is_alive(self) -> bool:
        return (self._proc is not None and self.error is None and not self._stopped
                and self._proc.exitcode is None)

    # -- commands (event loop) -------------------------------------------------------------

    def _send_add(self, handle: RequestHandle, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._next_key += 1
        handle.key = key = self._next_key
        self._by_key[key] = handle
        self._send(["add", key, handle.request_id, prompt_token_ids, params.model_dump()])

    def _send_abort(self, handle: RequestHandle) -> None:
        self._send(["abort", handle.key])

    def _forget(self, handle: RequestHandle) -> None:
        self._requests.pop(handle.request_id, None)
        self._by_key.pop(handle.key, None)

    def _send(self, msg: list[Any]) -> None:
        if self._commands is None:
            return
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
        assert self._commands is not None
        fd = self._commands.fileno()
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
        if self._commands is None:
            return
        fd = self._commands.fileno()
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
        conn = self._outputs
        if conn is None:
            return
        try:
            for _ in range(64):  # everything queued, within reason
                self._handle(_loads(conn.recv_bytes()))
                if self.error is not None or not conn.poll():
                    break
        except (EOFError, OSError):
            self._proc.join(1.0)
            self._die(f"the engine process exited ({_describe_exit(self._proc.exitcode)})")

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
                self.snapshot = _snapshot(stats)
        elif op == "stats":
            self.snapshot = _snapshot(msg[1])
        elif op == "err":
            handle = self._by_key.get(msg[1])
            if handle is not None:
                kind, text = msg[2], msg[3]
                self._fail(handle, ValueError(text) if kind == "ValueError" else RuntimeError(f"{kind}: {text}"))
        elif op == "dead":
            self._die(f"the engine raised {msg[2]}")
        else:
            logger.warning("unknown message from the engine process: %r", op)

    def _die(self, reason: str) -> None:
        if self.error is not None:
            return
        self.error = EngineDeadError(reason)
        s = self.snapshot
        self.snapshot = EngineSnapshot(s.num_running, s.num_waiting, s.kv_usage, s.num_kv_blocks,
                                       s.num_free_kv_blocks, s.num_prompt_tokens, s.num_generation_tokens,
                                       s.num_preemptions, s.num_steps, alive=False)
        logger.error("%s; /health now answers 503", reason)
        self._detach()
        self._fail_all(self.error)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
