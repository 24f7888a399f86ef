"""Length-prefixed frames on a pipe, read without ever blocking the event loop.

The framing is ``multiprocessing.connection``'s, so the engine process keeps using
``Connection.send_bytes``/``recv_bytes``: a 4-byte big-endian signed length, then the bytes; a
length of -1 means an 8-byte unsigned length follows (payloads over 2 GiB).

The parent does not read with ``Connection.recv_bytes``: it assumes a blocking fd and reads until a
whole message is in. Under uvloop, ``add_reader`` makes the fd non-blocking (libuv's
``uv_poll_init`` sets O_NONBLOCK), so a message larger than the pipe's buffer, half written when
the reader runs, made ``recv_bytes`` raise ``BlockingIOError`` (an ``OSError``) that was taken for
the engine's death; on a blocking fd it would instead block the event loop until the child wrote
the rest. :class:`FrameReader` reads what is there, keeps partial frames, and hands out whole ones.
"""

from __future__ import annotations

import os
import struct

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")

#: Most bytes one ``read_available`` takes before it yields to the event loop again.
READ_BUDGET = 8 << 20
_CHUNK = 1 << 20


def encode_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(n) + payload
    return _SHORT.pack(n) + payload


class FrameReader:
    """Reassembles frames from whatever pieces of the byte stream arrive."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first unparsed byte in _buf

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a whole frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame now complete, in order."""
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos, end = self._pos, len(buf)
        while end - pos >= 4:
            (size,) = _SHORT.unpack_from(buf, pos)
            head = 4
            if size == -1:
                if end - pos < 12:
                    break
                (size,) = _LONG.unpack_from(buf, pos + 4)
                head = 12
            elif size < 0:
                raise ValueError(f"corrupt frame header: length {size}")
            if end - pos - head < size:
                break
            start = pos + head
            frames.append(bytes(buf[start:start + size]))
            pos = start + size
        # Drop consumed bytes now and then, not per frame: deleting a prefix copies the rest.
        if pos == end:
            buf.clear()
            pos = 0
        elif pos > (1 << 20):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frames


def read_available(fd: int, budget: int = READ_BUDGET) -> tuple[bytes, bool]:
    """Read what a non-blocking ``fd`` has now, up to about ``budget`` bytes.

    Returns the bytes and whether the writer has closed its end (EOF)."""
    parts: list[bytes] = []
    total = 0
    while total < budget:
        try:
            chunk = os.read(fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts), False
