"""Frames reassembled from any split of the byte stream, as a non-blocking pipe delivers them."""

from __future__ import annotations

import os
import struct
from multiprocessing.connection import Pipe

import pytest

from sagellm_server.frames import FrameReader, encode_frame, read_available


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    payloads = [b"", b"x", b"hello" * 1000, bytes(range(256)) * 300]
    stream = b"".join(encode_frame(p) for p in payloads)
    for step in (1, 3, 4, 7, 4096, len(stream)):
        reader = FrameReader()
        got: list[bytes] = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == payloads and reader.pending == 0


def test_the_long_length_form_is_understood() -> None:
    # multiprocessing writes -1 and an 8-byte length for payloads over 2 GiB; the form is the same
    # for any size.
    data = struct.pack("!i", -1) + struct.pack("!Q", 5) + b"abcde" + encode_frame(b"z")
    reader = FrameReader()
    assert reader.feed(data[:9]) == [] and reader.feed(data[9:]) == [b"abcde", b"z"]


def test_a_corrupt_header_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="corrupt"):
        FrameReader().feed(struct.pack("!i", -7))


def test_what_multiprocessing_sends_is_read_without_blocking() -> None:
    r, w = Pipe(duplex=False)
    os.set_blocking(r.fileno(), False)
    reader = FrameReader()
    assert read_available(r.fileno()) == (b"", False)  # nothing there: no wait, no error
    w.send_bytes(b"a" * 50_000)
    w.send_bytes(b"b")
    data, eof = read_available(r.fileno())
    assert reader.feed(data) == [b"a" * 50_000, b"b"] and not eof
    w.close()
    assert read_available(r.fileno()) == (b"", True)
    r.close()
