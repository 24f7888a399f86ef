"""The engine process (the "engine core"): its loop, and the wire it speaks to the server.

With the engine in a thread of the server process, the event loop's per-token work for many
streams (routing outputs, building SSE chunks, writing sockets) and the engine's step compete for
one interpreter lock. Here the engine runs in a child started with ``multiprocessing``'s
``spawn`` context (safe with CUDA); the two sides talk over two pipes in a small JSON format, and
nothing is ever unpickled from them. The child builds ``LLMEngine`` from the ``EngineConfig`` JSON
it is given, reports ready, then loops: read commands (blocking only when idle), step, send that
step's outputs in one message.

Wire format: every message is one JSON array, framed as ``multiprocessing.connection`` frames
(a 4-byte big-endian length, then the bytes), so the child reads and writes with
``Connection.recv_bytes``/``send_bytes``; the parent frames and parses them itself
(``sagellm_server.frames``), so it neither blocks the event loop nor mistakes a half-arrived
message for a dead engine.

Parent to child (commands)::

    ["add", key, request_id, prompt_token_ids, sampling_params_dict, cache_salt | null]
    ["abort", key]
    ["stop"]                                 (closing the pipe means the same)

``key`` is a small integer the parent gives each request, shorter on the wire than its id.

Child to parent::

    ["ready", info]                          EngineInfo fields, once, after the engine is built
    ["fail", error_type, message]            building the engine failed; the child exits
    ["out", t, [output, ...], stats | null]  one step's outputs; t: the step's time.monotonic()
    ["stats", stats]                         sent when the engine goes idle (fresh after aborts)
    ["err", key, error_type, message]        the engine refused or failed this request (only this
                                             one); error_type "EngineError": RequestOutput.error
    ["dead", error_type, message]            the engine loop raised; the child exits

    output, running:  [key, new_token_ids, new_text, num_output_tokens, index, new_logprobs,
                       prompt_logprobs]
    output, finished: the same, then [finish_reason, stop_reason, text, token_ids,
                       num_prompt_tokens,
                       [arrival, first_scheduled, first_token, last_token, finished_time] | null,
                       num_preemptions]
    index: the choice (``SamplingParams.n`` > 1: each choice finishes apart; the request's key
           lives until all ``n`` have)
    new_logprobs, prompt_logprobs: null, or one [token_id, rank, [top id, ...], [logprob,
           top logprob, ...]] per token (null for a prompt token without one), the logprobs as
           the int32 bit patterns of their float32 values (encode_logprobs says why)
    stats: {"num_running": n, "num_waiting": n, "kv_usage": x, ...}: every field of
           sagellm.engine.stats.EngineStats by name (EngineStats.to_wire); the parent ignores
           names it does not know and gives missing ones their defaults (EngineStats.from_wire)

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

import contextlib
import functools
import importlib
import json
import logging
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
from sagellm.outputs import TokenLogprob
from sagellm.sampling_params import SamplingParams
from sagellm_server.async_engine import STATS_INTERVAL, EngineLike
from sagellm_server.frames import encode_frame

logger = logging.getLogger("sagellm.server")

#: How long an orphaned engine process may take to stop by itself before it is ended hard.
LIFELINE_GRACE_S = 5.0

#: ``error_type`` of an ``err`` message for ``RequestOutput.error`` (the engine failed the request).
ENGINE_ERROR = "EngineError"

_dumps = json.JSONEncoder(separators=(",", ":")).encode


@functools.cache
def _structs(n: int) -> tuple[struct.Struct, struct.Struct]:
    """``n`` int32 and ``n`` float32, native order (both ends are one machine)."""
    return struct.Struct(f"{n}i"), struct.Struct(f"{n}f")
loads = json.loads


def encode_logprobs(entries: list[TokenLogprob | None] | None) -> list[Any] | None:
    """Each entry as ``[token_id, rank, [top ids], [float32 bits of logprob, top logprobs]]``.

    The engine computes logprobs in float32; as bit patterns (int32) they cross the wire
    exactly and cheaply: writing a float as JSON takes its shortest round-trip repr (17 digits
    for a float32 value held in a double), which cost more than the rest of a token's output."""
    if entries is None:
        return None
    out: list[Any] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        top = e.top
        as_int, as_float = _structs(len(top) + 1)
        bits = as_int.unpack(as_float.pack(e.logprob, *(lp for _, lp in top)))
        out.append([e.token_id, e.rank, [t for t, _ in top], list(bits)])
    return out


def decode_logprobs(wire: list[Any] | None) -> list[TokenLogprob | None] | None:
    if wire is None:
        return None
    out: list[TokenLogprob | None] = []
    for e in wire:
        if e is None:
            out.append(None)
            continue
        bits = e[3]
        as_int, as_float = _structs(len(bits))
        lps = as_float.unpack(as_int.pack(*bits))
        out.append(TokenLogprob(e[0], lps[0], e[1], tuple(zip(e[2], lps[1:]))))
    return out


def frame(msg: list[Any]) -> bytes:
    return encode_frame(_dumps(msg).encode())


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
    #: The ids that end a sequence (model config, generation config and tokenizer together):
    #: grammars checked in the server allow exactly these at their end, as the engine does.
    eos_token_ids: tuple[int, ...] = ()


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
        pid=os.getpid(),
        eos_token_ids=tuple(sorted(int(t) for t in getattr(engine, "eos_token_ids", ()) or ())))


class EngineStartupError(RuntimeError):
    """The engine process could not build the engine; ``error_type`` names the child's exception."""

    def __init__(self, error_type: str, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        #: The engine process's exit status, once it has been stopped.
        self.exitcode = exitcode


def _stats(engine: EngineLike) -> dict[str, Any]:
    return engine.get_stats().to_wire()


class EngineCore:
    """The child's loop around one engine."""

    def __init__(self, engine: EngineLike, commands: Connection, outputs: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.keys: dict[str, int] = {}  # request id -> key
        self.ids: dict[int, str] = {}  # key -> request id
        self.unfinished: dict[int, int] = {}  # key -> choices not finished yet
        self.last_stats: dict[str, Any] | None = None
        self.last_stats_time = 0.0

    def send(self, msg: list[Any]) -> None:
        self.outputs.send_bytes(_dumps(msg).encode())

    def apply(self, raw: bytes) -> bool:
        """Carry out one command; False on ``stop``."""
        msg = loads(raw)
        op = msg[0]
        if op == "add":
            _, key, rid, ids, params, cache_salt = msg
            try:
                sp = SamplingParams.model_validate(params)
                self.engine.add_request(ids, sp, rid, cache_salt=cache_salt)
            except Exception as exc:  # validation the server missed: fail this request only
                self.send(["err", key, type(exc).__name__, str(exc)])
                return True
            self.keys[rid] = key
            self.ids[key] = rid
            self.unfinished[key] = sp.n
        elif op == "abort":
            rid = self.ids.pop(msg[1], None)
            if rid is not None:
                del self.keys[rid], self.unfinished[msg[1]]
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

    def encode(self, outputs: list[Any]) -> tuple[float, list[list[Any]], list[list[Any]]]:
        """The step's ``out`` items, and an ``err`` message for each request the engine failed."""
        keys, ids = self.keys, self.ids
        items: list[list[Any]] = []
        errors: list[list[Any]] = []
        t = 0.0
        for o in outputs:
            key = keys.get(o.request_id)
            if key is None:
                continue  # aborted by the parent while this step ran
            m = o.metrics
            if m is not None and m.last_token_time is not None:
                t = m.last_token_time
            if o.finished:
                self.unfinished[key] -= 1
                error = getattr(o, "error", None)  # RequestOutput.error, on cores that have it
                if error or not self.unfinished[key]:
                    del keys[o.request_id], ids[key], self.unfinished[key]
                if error:  # one choice failed: the request fails (its other choices are dropped)
                    errors.append(["err", key, ENGINE_ERROR, str(error)])
                    continue
                times = None if m is None else [m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                                m.last_token_time, m.finished_time]
                items.append([key, o.new_token_ids, o.new_text, o.num_output_tokens, o.index,
                              encode_logprobs(o.new_logprobs), encode_logprobs(o.prompt_logprobs),
                              o.finish_reason, o.stop_reason, o.text, o.token_ids, o.num_prompt_tokens,
                              times, o.num_preemptions])
            else:
                items.append([key, o.new_token_ids, o.new_text, o.num_output_tokens, o.index,
                              encode_logprobs(o.new_logprobs), encode_logprobs(o.prompt_logprobs)])
        return t or time.monotonic(), items, errors

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
                t, items, errors = self.encode(outputs)
                if items or stats is not None:
                    self.send(["out", t, items, stats])
                for err in errors:
                    self.send(err)


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
            core.send(["dead", type(exc).__name__, detail])


def build_engine(config_json: str, factory: str | None) -> EngineLike:
    """The engine for ``config_json``: ``LLMEngine``, or what ``factory`` builds."""
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
            engine = build_engine(config_json, factory)
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
