"""One soak request on the wire, and what became of it (an :class:`Outcome`).

Standard library only: ``http.client`` on a fresh connection per request, read with ``read1``
so one call returns whatever SSE events arrived together. Events are not JSON-decoded on the
happy path: the server's chunks start with ``{"id"`` and carry ``"token_ids":[...]``, so the
token count is a comma count. Anything else (an error event, another layout) is decoded. That
keeps one client process far from being the bottleneck at 256 streams (the soak reports its
own CPU use per level to show it).
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from dataclasses import dataclass, field

from sagellm.bench.soak_probe import Target
from sagellm.bench.soak_requests import BadRequest, GoodRequest

_IDS = b'"token_ids":['


@dataclass
class Outcome:
    """``kind``: ok, disconnected (we hung up on purpose), or an error: http_<status>, connect,
    timeout, connection, error_event, no_done, token_count, cut (still streaming at the level's
    hard deadline: a stall, as the drain time is many times a request's length)."""

    kind: str
    tokens: int = 0
    events: int = 0
    start: float = 0.0
    first: float | None = None
    end: float = 0.0
    detail: str = ""

    @property
    def is_error(self) -> bool:
        return self.kind not in ("ok", "disconnected")


@dataclass
class SseCounter:
    """Counts generated tokens in a byte stream of SSE events and notes errors and ``[DONE]``."""

    tokens: int = 0
    events: int = 0
    done: bool = False
    error: str | None = None
    first: float | None = None
    _buf: bytes = field(default=b"", repr=False)

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        *events, self._buf = self._buf.split(b"\n\n")
        for ev in events:
            self._event(ev.strip(), now)

    def _event(self, ev: bytes, now: float) -> None:
        if not ev.startswith(b"data:") or self.done:
            return
        data = ev[5:].strip()
        self.events += 1
        if data == b"[DONE]":
            self.done = True
            return
        n = count_tokens(data)
        if n is None:
            self.error = self.error or data[:300].decode(errors="replace")
        elif n:
            self.tokens += n
            if self.first is None:
                self.first = now


def count_tokens(data: bytes) -> int | None:
    """Tokens in one chunk's payload; None for an error event or an undecodable one."""
    if data.startswith(b'{"id"') and b'"error"' not in data[:40]:
        i = data.find(_IDS)
        if i >= 0:
            j = data.find(b"]", i)
            inner = data[i + len(_IDS):j].strip()
            return inner.count(b",") + 1 if inner else 0
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "error" in obj:
        return None
    n = 0
    for choice in obj.get("choices") or []:
        ids = choice.get("token_ids")
        n += len(ids) if isinstance(ids, list) else 0
    return n


def hang_up(conn: http.client.HTTPConnection, reset: bool) -> None:
    """Close the socket now: a RST if ``reset`` (SO_LINGER 0), else a FIN."""
    sock = conn.sock
    if sock is not None:
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def stream(target: Target, req: GoodRequest, hard_deadline: float, read_timeout: float) -> Outcome:
    """Send a good request and read its stream to the end, or hang up where ``req`` says."""
    out = Outcome("ok", start=time.perf_counter())
    conn = http.client.HTTPConnection(target.host, target.port, timeout=read_timeout)
    try:
        try:
            conn.request("POST", req.path, req.body, target.headers(json_body=True))
            resp = conn.getresponse()
        except TimeoutError:
            return _done(out, "timeout", "no response headers")
        except (OSError, http.client.HTTPException) as exc:
            return _done(out, "connect", repr(exc))
        if resp.status != 200:
            return _done(out, f"http_{resp.status}", resp.read(300).decode(errors="replace"))
        sse = SseCounter()
        while True:
            if req.disconnect_after is not None and sse.tokens >= req.disconnect_after:
                hang_up(conn, req.reset)
                return _done(out, "disconnected", sse=sse)
            if time.monotonic() > hard_deadline:
                hang_up(conn, False)
                return _done(out, "cut", sse=sse)
            try:
                data = resp.read1(65536)
            except TimeoutError:
                return _done(out, "timeout", f"no data for {read_timeout} s", sse)
            except (OSError, http.client.HTTPException) as exc:
                return _done(out, "connection", repr(exc), sse)
            if data:
                sse.feed(data, time.perf_counter())
            if not data or sse.done:
                break
        if sse.error is not None:
            return _done(out, "error_event", sse.error, sse)
        if not sse.done:
            return _done(out, "no_done", "the stream ended without [DONE]", sse)
        if sse.tokens != req.max_tokens:
            return _done(out, "token_count", f"{sse.tokens} tokens, max_tokens {req.max_tokens}",
                         sse)
        return _done(out, "ok", sse=sse)
    finally:
        conn.close()


def _done(out: Outcome, kind: str, detail: str = "", sse: SseCounter | None = None) -> Outcome:
    out.kind, out.detail, out.end = kind, detail, time.perf_counter()
    if sse is not None:
        out.tokens, out.events, out.first = sse.tokens, sse.events, sse.first
    return out


def send_bad(target: Target, req: BadRequest, body: bytes, read_timeout: float) -> tuple[str, str]:
    """Send a hostile request: (``4xx`` | ``http_<status>`` | ``connect`` | ``timeout``, detail).

    A 200 stream is read until ``[DONE]`` or 64 KiB, so a server that accepts it does not keep
    the connection busy with our unread bytes; it is a failure either way.
    """
    conn = http.client.HTTPConnection(target.host, target.port, timeout=read_timeout)
    try:
        try:
            conn.request("POST", req.path, body, target.headers(json_body=True))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server may answer (413, 400) before reading all of a large body
        resp = conn.getresponse()
        first = data = resp.read1(65536) if resp.status == 200 else resp.read(65536)
        got = len(data)
        while resp.status == 200 and data and b"[DONE]" not in data[-64:] and got < 65536:
            data = resp.read1(65536)
            got += len(data)
        kind = "4xx" if 400 <= resp.status < 500 else f"http_{resp.status}"
        return kind, f"{resp.status} {first[:200].decode(errors='replace')}"
    except TimeoutError:
        return "timeout", f"no answer in {read_timeout} s"
    except (OSError, http.client.HTTPException) as exc:
        return "connect", repr(exc)
    finally:
        conn.close()
