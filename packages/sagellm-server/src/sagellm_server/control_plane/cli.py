"""``sagellm-control-plane``: the engine registry and the OpenAI router in front of many
``sagellm-server`` engines (started with ``--control-plane URL``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sagellm_server import http_limits
from sagellm_server.cli import API_KEY_ENV
from sagellm_server.control_plane.protocol import SECRET_ENV

ENGINE_API_KEY_ENV = "SAGELLM_ENGINE_API_KEY"

logger = logging.getLogger("sagellm.control_plane")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sagellm-control-plane",
        description="Register sagellm-server engines (sagellm-server --control-plane URL) and route "
                    "OpenAI requests (/v1/completions, /v1/chat/completions, streaming included) to "
                    "the healthy ones: least outstanding work, with prefix affinity. Also serves "
                    "/v1/models, /v1/engines, /v1/backends, /metrics and /health.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and the "
                        f"registration routes (default: ${API_KEY_ENV}; never printed)")
    s.add_argument("--registration-secret", default=None,
                   help=f"the secret engines register with (sagellm-server --control-plane-secret); "
                        f"required (default: ${SECRET_ENV}; never printed)")
    s.add_argument("--engine-api-key", default=None,
                   help=f"the API key the router sends to engines (their --api-key) (default: "
                        f"${ENGINE_API_KEY_ENV}, else the --api-key)")
    s.add_argument("--max-request-body-bytes", type=int, default=4 << 20,
                   help="larger request bodies get HTTP 413")
    http_limits.add_arguments(s)
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r = p.add_argument_group("registry")
    r.add_argument("--missed-heartbeats", type=int, default=3,
                   help="heartbeats an engine may miss before it is marked down (no traffic)")
    r.add_argument("--drop-after", type=float, default=30.0,
                   help="seconds without a heartbeat after which an engine leaves the registry")
    r.add_argument("--unreachable-cooldown", type=float, default=5.0,
                   help="seconds an engine gets no traffic after the router failed to reach it")
    t = p.add_argument_group("routing")
    t.add_argument("--max-retries", type=int, default=2,
                   help="times a request that failed before any output is tried on another engine")
    t.add_argument("--affinity-prefix-chars", type=int, default=256,
                   help="characters of a text prompt (or of the chat messages) that pick its engine; "
                        "0: no prefix affinity, least outstanding work only")
    t.add_argument("--affinity-prefix-tokens", type=int, default=64,
                   help="token ids of a token prompt that pick its engine")
    t.add_argument("--overload-factor", type=float, default=2.0,
                   help="an affine engine with more than this times the least-loaded engine's "
                        "outstanding work (plus --overload-slack) is passed over")
    t.add_argument("--overload-slack", type=int, default=4,
                   help="requests of extra work an affine engine may have before it counts as overloaded")
    t.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an engine")
    t.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds an engine may go without sending any of its response")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # From the environment here rather than as argparse defaults, so --help never prints them.
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    secret = args.registration_secret or os.environ.get(SECRET_ENV) or None
    engine_key = args.engine_api_key or os.environ.get(ENGINE_API_KEY_ENV) or api_key
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    if not secret:
        print(f"sagellm-control-plane: error: a registration secret is required: "
              f"--registration-secret or ${SECRET_ENV}", file=sys.stderr)
        return 2
    for name in ("missed_heartbeats", "max_retries", "affinity_prefix_tokens", "overload_slack"):
        if getattr(args, name) < 0:
            print(f"sagellm-control-plane: error: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    import uvicorn

    from sagellm_server.control_plane.app import ControlPlaneConfig, create_control_plane
    from sagellm_server.control_plane.placement import PlacementPolicy
    from sagellm_server.control_plane.registry import EngineRegistry, RegistryPolicy

    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("binding %s without --api-key: anyone who can reach it may use it", args.host)
    registry = EngineRegistry(RegistryPolicy(missed_heartbeats=max(1, args.missed_heartbeats),
                                             drop_after=args.drop_after,
                                             unreachable_cooldown=args.unreachable_cooldown))
    placement = PlacementPolicy(prefix_chars=args.affinity_prefix_chars,
                                prefix_tokens=args.affinity_prefix_tokens,
                                overload_factor=args.overload_factor, overload_slack=args.overload_slack)
    config = ControlPlaneConfig(
        registration_secret=secret, api_key=api_key, engine_api_key=engine_key,
        max_request_body_bytes=args.max_request_body_bytes, body_timeout=args.body_timeout,
        max_retries=args.max_retries, connect_timeout=args.connect_timeout,
        upstream_timeout=args.upstream_timeout, placement=placement,
        sweep_interval=min(1.0, max(0.05, args.drop_after / 10)))
    app = create_control_plane(config, registry)
    logger.info("control plane on http://%s:%d (API key %s)", args.host, args.port,
                "required" if api_key else "off")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                           access_log=args.access_log, log_level=args.log_level,
                                           timeout_graceful_shutdown=5,
                                           **http_limits.uvicorn_kwargs(args)))
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
