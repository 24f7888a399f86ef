"""``sagellm-server``'s flags that register it with a control plane (``--control-plane URL``),
and the :class:`~sagellm_server.control_plane.heartbeat.Heartbeat` they describe."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sagellm_server.control_plane.protocol import SECRET_ENV, EngineRegistration

if TYPE_CHECKING:
    from sagellm_server.async_engine import EngineClient
    from sagellm_server.control_plane.heartbeat import Heartbeat
    from sagellm_server.engine_core import EngineInfo

logger = logging.getLogger("sagellm.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("control plane", "register with a sagellm-control-plane, which "
                             "routes requests here")
    c.add_argument("--control-plane", metavar="URL", default=None,
                   help="the control plane to register with and heartbeat to (off by default)")
    c.add_argument("--control-plane-secret", default=None,
                   help=f"its registration secret (default: ${SECRET_ENV}; never printed)")
    c.add_argument("--advertise-url", metavar="URL", default=None,
                   help="the URL the control plane reaches this server at (behind NAT, in a "
                        "container); default: http://HOST:PORT")
    c.add_argument("--heartbeat-interval", metavar="S", type=float, default=2.0,
                   help="seconds between heartbeats to the control plane")


def heartbeat(args: argparse.Namespace, info: EngineInfo, names: list[str],
               engine: EngineClient) -> Heartbeat | None:
    """The control-plane heartbeat for ``--control-plane``, or None without it."""
    if not args.control_plane:
        return None
    from sagellm_server import __version__
    from sagellm_server.control_plane.heartbeat import Heartbeat, engine_load

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    registration = EngineRegistration(
        url=args.advertise_url, models=names, backend=info.backend, device=info.device_name,
        max_model_len=info.max_model_len, num_kv_blocks=info.num_kv_blocks,
        block_size=info.block_size, max_num_seqs=args.max_num_seqs,
        heartbeat_interval=args.heartbeat_interval, version=__version__)
    return Heartbeat(args.control_plane, args.control_plane_secret, registration,
                     lambda: engine_load(engine))


def check_arguments(args: argparse.Namespace) -> str | None:
    """Fill in the secret and the advertised URL for ``--control-plane``; an error message if
    they cannot be (checked before the engine loads, which takes a while)."""
    if not args.control_plane:
        return None
    args.control_plane_secret = args.control_plane_secret or os.environ.get(SECRET_ENV)
    if not args.control_plane_secret:
        return f"--control-plane needs a registration secret: --control-plane-secret or ${SECRET_ENV}"
    if not args.control_plane.startswith(("http://", "https://")):
        return f"--control-plane must be an http:// or https:// URL, not {args.control_plane!r}"
    if args.advertise_url is None:
        host = args.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
            logger.warning("advertising http://%s:%d to the control plane; pass --advertise-url "
                           "if it cannot reach that", host, args.port)
        args.advertise_url = f"http://{'[' + host + ']' if ':' in host else host}:{args.port}"
    try:
        EngineRegistration(url=args.advertise_url, models=["-"],
                           heartbeat_interval=args.heartbeat_interval)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        flag = "--advertise-url" if err["loc"][0] == "url" else "--heartbeat-interval"
        return f"{flag}: {err['msg']}"
    return None
