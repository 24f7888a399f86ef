"""``sagellm-server``: load one engine and serve it over the OpenAI HTTP API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm.engine_flags import EngineFlags
from sagellm_server import http_limits
from sagellm_server.control_plane import server_flags
from sagellm_server.tool_parsers import PARSERS

if TYPE_CHECKING:
    from sagellm.config import EngineConfig
    from sagellm_server.async_engine import EngineClient
    from sagellm_server.engine_process import EngineInfo
    from sagellm_server.metrics import ServerMetrics

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "SAGELLM_API_KEY"

logger = logging.getLogger("sagellm.server")

#: The engine's flags, generated from EngineConfig with its defaults (none differs here).
ENGINE_FLAGS = EngineFlags()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sagellm-server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/tokenize, /v1/detokenize, /v1/models, /v1/backends, "
                    "/metrics, /health, /version). "
                    "All clients share one engine, so their requests are batched together.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists; default: the model "
                        "directory or file name")
    e = p.add_argument_group("engine", "every EngineConfig field, as its --flag")
    ENGINE_FLAGS.add_to(e)
    e.add_argument("--max-queued-requests", type=int, default=1024,
                   help="most requests waiting beyond the running batch; more get HTTP 503")
    e.add_argument("--engine-in-process", action=argparse.BooleanOptionalAction, default=False,
                   help="run the engine in a thread of the server process instead of a process of "
                        "its own (simpler, but HTTP work then competes with it for the GIL)")
    e.add_argument("--engine-startup-timeout", type=float, default=None,
                   help="seconds to wait for the engine process to load the model (default: no limit)")
    # Tests only: build a scripted engine ("module:callable") instead of LLMEngine.
    e.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    r = p.add_argument_group("robustness")
    r.add_argument("--on-engine-death", choices=["restart", "exit"], default="restart",
                   help="when the engine dies (or hangs): start a new engine process, or exit with "
                        "status 1 for an outside supervisor to restart the server. With "
                        "--engine-in-process the server always exits")
    r.add_argument("--engine-restarts", metavar="N", type=int, default=3,
                   help="most engine restarts within --engine-restart-window; past that the server "
                        "exits with status 1")
    r.add_argument("--engine-restart-window", metavar="S", type=float, default=600.0,
                   help="seconds over which --engine-restarts are counted")
    r.add_argument("--engine-restart-backoff", metavar="S", type=float, default=1.0,
                   help="seconds before the first restart in a window, doubled for each further one")
    r.add_argument("--engine-restart-backoff-max", metavar="S", type=float, default=30.0,
                   help="longest wait before a restart")
    r.add_argument("--engine-hang-timeout", metavar="S", type=float, default=120.0,
                   help="seconds the engine may go without finishing a step while requests are in "
                        "flight before it counts as hung (killed, then as --on-engine-death); keep it "
                        "above your longest step; 0: never")
    r.add_argument("--shutdown-timeout", metavar="S", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish before "
                        "they are ended with an error; new requests get 503 meanwhile")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind; use 0.0.0.0 to accept other machines (set --api-key then)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV}, which keeps the key out of `ps`; never printed)")
    s.add_argument("--max-request-body-bytes", type=int, default=4 << 20,
                   help="larger request bodies get HTTP 413")
    s.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between throughput log lines (0: none)")
    s.add_argument("--request-chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="accept a chat_template in chat requests (rendered in a sandbox with time "
                        "and size limits); --no-request-chat-template refuses them with 400")
    s.add_argument("--lenient-request-fields", action="store_true",
                   help="ignore unknown top-level request fields instead of refusing them with "
                        "400 (for clients that send extras); fields the server knows but does not "
                        "implement are still refused")
    s.add_argument("--tool-call-parser", default="auto", choices=["auto", *PARSERS],
                   help="how tool calls are read from the model's output: auto (from the chat "
                        "template: <tool_call> tags for Hermes/Qwen2.5, JSON for Llama 3.x)")
    http_limits.add_arguments(s)
    server_flags.add_arguments(p)
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return str(args.served_model_name)
    if args.model:
        from sagellm.loader.hub import is_repo_id

        # A Hub repo id is served under its own name (``Qwen/Qwen3-0.6B``), as clients expect.
        return str(args.model) if is_repo_id(args.model) else (Path(args.model).name or str(args.model))
    return DEFAULT_MODEL_NAME


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Read here rather than as the argparse default, so --help never prints the key.
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = server_flags.check_arguments(args)
    if problem is not None:
        print(f"sagellm-server: error: {problem}", file=sys.stderr)
        return 2
    import uvicorn
    from pydantic import ValidationError

    from sagellm.config import EngineConfig
    from sagellm.plugins import BackendError, get_registry
    from sagellm_server.app import ServerConfig, create_app
    from sagellm_server.engine_process import EngineStartupError
    from sagellm_server.metrics import ServerMetrics
    from sagellm_server.server import GracefulServer
    from sagellm_server.supervisor import EngineSupervisor, ExitRequest, SupervisionPolicy

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach it may use it", args.host)
    name = _served_name(args)
    metrics = ServerMetrics(name)
    try:
        config = EngineConfig(**ENGINE_FLAGS.config_kwargs(args))
        registry = get_registry()
        if args.engine_in_process:
            async_engine, info, tokenizer = _engine_in_process(config, registry, args, metrics)
        else:
            async_engine, info, tokenizer = _engine_process(config, args, metrics)
    except (ValidationError, BackendError, FileNotFoundError, ValueError) as exc:
        print(f"sagellm-server: error: {exc}", file=sys.stderr)
        return 2
    except EngineStartupError as exc:
        print(f"sagellm-server: error: {exc}", file=sys.stderr)
        return 2 if exc.error_type in _CONFIG_ERRORS else 1
    try:
        server_config = ServerConfig(
            served_model_name=name, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            api_key=args.api_key or None, max_request_body_bytes=args.max_request_body_bytes,
            log_interval=args.log_interval, backend=info.backend, device_name=info.device_name,
            registry=registry, body_timeout=args.body_timeout,
            allow_request_chat_template=args.request_chat_template,
            lenient_request_fields=args.lenient_request_fields, tool_call_parser=args.tool_call_parser)
        exit_request = ExitRequest()
        policy = SupervisionPolicy(
            on_engine_death=args.on_engine_death, max_restarts=args.engine_restarts,
            restart_window_s=args.engine_restart_window, backoff_s=args.engine_restart_backoff,
            backoff_max_s=args.engine_restart_backoff_max, hang_timeout_s=args.engine_hang_timeout,
            startup_timeout_s=args.engine_startup_timeout)
        supervisor = EngineSupervisor(async_engine, policy, exit_request, metrics)
        app = create_app(async_engine, server_config, tokenizer, metrics, supervisor)
        heartbeat = server_flags.heartbeat(args, info, [name], async_engine)
        if heartbeat is not None:
            heartbeat.attach(app)
        logger.info("serving %s as %r on http://%s:%d (backend %s, context %d, engine %s, API key %s)",
                    info.model, name, args.host, args.port, info.backend, info.max_model_len,
                    "in process" if args.engine_in_process else f"process pid {info.pid}",
                    "required" if args.api_key else "off")
        # The graceful drain happens before uvicorn's own shutdown; its timeout only covers
        # flushing the responses that the drain completed or ended.
        server = GracefulServer(
            uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                           access_log=args.access_log, log_level=args.log_level,
                           timeout_graceful_shutdown=5, **http_limits.uvicorn_kwargs(args)),
            async_engine, exit_request, shutdown_timeout=args.shutdown_timeout,
            before_drain=heartbeat.stop if heartbeat is not None else None)
        server.run()
    finally:
        async_engine.shutdown()  # normally done on the app's shutdown already; idempotent
    if not server.started:
        return _STARTUP_FAILURE
    return server.exit_code


#: uvicorn's exit status when it could not start serving (for example, the port is taken).
_STARTUP_FAILURE = 3


#: Errors of the engine process's start-up that mean "bad settings" (exit status 2).
_CONFIG_ERRORS = frozenset({"ValidationError", "BackendError", "FileNotFoundError", "ValueError"})


def _engine_process(config: EngineConfig, args: argparse.Namespace,
                    metrics: ServerMetrics) -> tuple[EngineClient, EngineInfo, Any]:
    from sagellm_server.engine_process import EngineProcess
    from sagellm_server.tokenizer_preload import TokenizerPreload

    # transformers and a local model folder's tokenizer load while the engine process starts.
    preload = TokenizerPreload(config.model)
    engine = EngineProcess(config, max_num_seqs=args.max_num_seqs,
                           max_queued_requests=args.max_queued_requests, metrics=metrics,
                           factory=args.engine_factory)
    info = engine.launch(timeout=args.engine_startup_timeout)
    tokenizer = None
    if info.tokenizer is not None:
        try:
            tokenizer = preload.get(info.tokenizer)
        except BaseException:
            engine.shutdown()
            raise
    return engine, info, tokenizer


def _engine_in_process(config: EngineConfig, registry: Any, args: argparse.Namespace,
                       metrics: ServerMetrics) -> tuple[EngineClient, EngineInfo, Any]:
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm_server.async_engine import AsyncEngine
    from sagellm_server.engine_process import build_engine, describe_engine

    if args.engine_factory is not None:
        engine: Any = build_engine(config.model_dump_json(), args.engine_factory)
    else:
        engine = LLMEngine(config, registry=registry)
    async_engine = AsyncEngine(engine, max_num_seqs=args.max_num_seqs,
                               max_queued_requests=args.max_queued_requests, metrics=metrics)
    return async_engine, describe_engine(engine), getattr(engine, "tokenizer", None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
