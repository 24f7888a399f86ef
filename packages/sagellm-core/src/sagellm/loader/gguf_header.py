"""Where a GGUF file's metadata ends, read without the ``gguf`` package.

``gguf.GGUFReader`` materialises every metadata array (a 49k-token vocabulary and its merges)
and takes seconds on a small machine; the cache key is computed on every load, so it walks the
header with ``struct`` over a memory map instead and only skips the values it does not need.
Layout (GGUF v2/v3, little-endian): magic, version, tensor count, KV count, the KV pairs, the
tensor infos, padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
#: Byte size of each fixed-size value type (uint8 ... float64; 8 and 9 are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    num_tensors: int
    #: End of the tensor infos: everything before it is header and metadata.
    metadata_end: int
    #: Start of the tensor data (``metadata_end`` rounded up to the alignment).
    data_start: int
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return int(value)

    def string(self) -> bytes:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n: self.pos])

    def skip_value(self, vtype: int) -> None:
        if vtype in _FIXED:
            self.pos += _FIXED[vtype]
        elif vtype == _STRING:
            n = self.take("Q")  # read before adding: `pos += take()` would add to the old pos
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _FIXED:
                self.pos += _FIXED[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")
        if self.pos > len(self.buf):
            raise ValueError("GGUF metadata runs past the end of the file")


def has_metadata_key(path: str | Path, key: bytes) -> bool:
    """Whether ``path``'s metadata holds ``key`` (values skipped, as in :func:`read_layout`)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        cur.pos = 4 + 4 + 8  # magic, version, tensor count
        for _ in range(cur.take("Q")):
            name, vtype = cur.string(), cur.take("I")
            if name == key:
                return True
            cur.skip_value(vtype)
        return False


def read_layout(path: str | Path) -> GGUFLayout:
    """The offsets of ``path``'s metadata and tensor data; ValueError if it is not GGUF v2/v3."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        num_tensors, num_kv = cur.take("Q"), cur.take("Q")
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(num_kv):
            key, vtype = cur.string(), cur.take("I")
            if key == b"general.alignment" and vtype == 4:
                alignment = cur.take("I")
            else:
                cur.skip_value(vtype)
        for _ in range(num_tensors):
            cur.string()
            n_dims = cur.take("I")
            cur.pos += 8 * n_dims + 4 + 8  # dims, type, offset
        end = cur.pos
        if end > len(buf):
            raise ValueError("GGUF tensor infos run past the end of the file")
        start = -(-end // alignment) * alignment
        return GGUFLayout(version, num_tensors, end, start, len(buf))
