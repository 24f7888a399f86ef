"""Limits on slow and numerous clients, below the app: header and body read timeouts and a cap
on open connections.

uvicorn closes idle keep-alive connections but waits for a request's headers and body forever,
so a few hundred connections that each send half a header ("slowloris") hold the server's
sockets and memory without ever reaching the API-key check. Header timeouts and the connection
cap live in the HTTP protocol (:func:`protocol_class`, passed to uvicorn as ``http=``); the body
timeout lives in the ASGI layer (:mod:`sagellm_server.body_timeout`), where the app can answer 408.
This module stays light (no pydantic, no uvicorn until used): the CLI imports it for its flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

logger = logging.getLogger("sagellm.server")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 2048

_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s")
_REFUSED_BODY = (b'{"error":{"message":"too many open connections","type":'
                 b'"service_unavailable_error","param":null,"code":"too_many_connections"}}')
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class _LimitsMixin:
    """Mixed into uvicorn's HTTP protocol classes (h11 or httptools; both keep ``cycle``,
    ``transport``, ``connections`` and ``loop``). A new connection, and a kept-alive one once
    the next request's first byte arrives, must complete its headers within ``header_timeout``."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS

    transport: asyncio.Transport
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    cycle: Any
    client: tuple[str, int] | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            logger.warning("refused a connection from %s: %d connections are open (--max-connections)",
                           _peer(self.client), len(self.connections) - 1)
            transport.write(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
            transport.close()
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete
            self._cancel_header_timer()
        elif self.cycle is None or self.cycle.response_complete:
            self._got_bytes = True
            if self._header_timer is None:  # started once per request, not per byte
                self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._got_bytes = False  # the keep-alive timer covers the idle time that follows

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        if self._got_bytes:
            logger.info("closed a connection from %s: its request headers were not complete "
                        "within %g s (--header-timeout)", _peer(self.client), self.header_timeout)
            self.transport.write(_TIMED_OUT)
        else:
            logger.debug("closed an idle connection from %s after %g s", _peer(self.client),
                         self.header_timeout)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(header_timeout: float, max_connections: int | None,
                   base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (its ``auto`` choice unless ``base``) with these limits."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"Limited{base.__name__}", (_LimitsMixin, base),
                {"header_timeout": header_timeout, "max_connections": max_connections})


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                       help="seconds a connection may take to send a request's headers, "
                            "counted from its first byte (or from connecting); then it is closed")
    group.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                       help="seconds the server waits for each part of a request body; "
                            "then it answers 408")
    group.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       help="most open HTTP connections; more are answered 503 and closed")


def uvicorn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The uvicorn settings for these limits (the body timeout is the app's: ServerConfig)."""
    return {"http": protocol_class(args.header_timeout, args.max_connections)}
