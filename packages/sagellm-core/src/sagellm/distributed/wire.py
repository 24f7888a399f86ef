"""Step messages as tensors: what rank 0 broadcasts to the other ranks every step.

A message is a small dataclass tree (``ModelInput`` and its attention metadata, plus a few lists of
ints). It travels as two ``CommBackend.broadcast`` calls and nothing else - no pickle, so a rank
can never be made to run code by what arrives:

* a fixed header ``int64[3]``: ``[command, schema_len, payload_len]``;
* one ``int64`` body: the schema (what each field is: None, int, bool, float, list of ints, or a
  tensor's dtype and shape, nested dataclasses by their index in :data:`WIRE_TYPES`) followed by
  the payload (every tensor's elements, reinterpreted as integers of the same width and widened
  to int64, so floating-point tensors cross bit-exact).

Both sides walk the dataclass fields in declaration order, so the schema carries no names. A
dataclass that is not in :data:`WIRE_TYPES` is refused on the sending side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

import torch

from sagellm.engine.model_runner import ModelInput
from sagellm.protocols import AttentionMetadata, CommBackend, DecodeMetadata, PrefillMetadata

HEADER_LEN = 3

_NONE, _INT, _BOOL, _FLOAT, _LIST, _TENSOR, _OBJ = range(7)

_DTYPES: list[torch.dtype] = [
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
# Same-width integer view of each dtype: the payload holds bits, not values.
_BITS_AS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Dataclasses that may travel, by a stable code derived from their import path (so the order
#: in which ranks happened to import them does not matter).
WIRE_TYPES: dict[int, type] = {}


def _type_code(cls: type) -> int:
    name = f"{cls.__module__}.{cls.__qualname__}".encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=7).digest(), "little")


def register_wire_type(cls: type) -> type:
    """Allow ``cls`` (a dataclass) in messages; every rank must import the module that does."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    WIRE_TYPES[_type_code(cls)] = cls
    return cls


for _cls in (ModelInput, AttentionMetadata, PrefillMetadata, DecodeMetadata):
    register_wire_type(_cls)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def _as_int64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    if t.dtype != torch.int64:
        t = t.contiguous().view(_BITS_AS[t.element_size()]).to(torch.int64)
    return t


def _from_int64(flat: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype == torch.bool:
        return (flat != 0).view(shape)
    if dtype != torch.int64:
        size = torch.empty((), dtype=dtype).element_size()
        flat = flat.to(_BITS_AS[size]).view(dtype)
    return flat.view(shape)


class _Encoder:
    def __init__(self) -> None:
        self.schema: list[int] = []
        self.tensors: list[torch.Tensor] = []

    def add(self, value: Any) -> None:
        s = self.schema
        if value is None:
            s.append(_NONE)
        elif isinstance(value, bool):
            s += [_BOOL, int(value)]
        elif isinstance(value, int):
            s += [_INT, value]
        elif isinstance(value, float):
            s += [_FLOAT, _float_bits(value)]
        elif isinstance(value, torch.Tensor):
            if value.dtype not in _DTYPE_CODE:
                raise TypeError(f"cannot send a {value.dtype} tensor")
            s += [_TENSOR, _DTYPE_CODE[value.dtype], value.dim(), *value.shape]
            self.tensors.append(_as_int64(value))
        elif isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) for v in value):
                raise TypeError("only lists of ints can be sent")
            s += [_LIST, len(value), *value]
        elif dataclasses.is_dataclass(value) and _type_code(type(value)) in WIRE_TYPES:
            fields = dataclasses.fields(value)
            s += [_OBJ, _type_code(type(value)), len(fields)]
            for f in fields:
                self.add(getattr(value, f.name))
        else:
            raise TypeError(f"cannot send a {type(value).__name__}: register it with register_wire_type")


class _Decoder:
    def __init__(self, schema: list[int], payload: torch.Tensor) -> None:
        self.schema = schema
        self.payload = payload
        self.pos = 0
        self.offset = 0

    def _next(self) -> int:
        v = self.schema[self.pos]
        self.pos += 1
        return v

    def read(self) -> Any:
        tag = self._next()
        if tag == _NONE:
            return None
        if tag == _INT:
            return self._next()
        if tag == _BOOL:
            return bool(self._next())
        if tag == _FLOAT:
            return _bits_float(self._next())
        if tag == _LIST:
            n = self._next()
            out = self.schema[self.pos:self.pos + n]
            self.pos += n
            return out
        if tag == _TENSOR:
            dtype = _DTYPES[self._next()]
            shape = [self._next() for _ in range(self._next())]
            numel = 1
            for d in shape:
                numel *= d
            if self.offset + numel > self.payload.numel():
                raise ValueError("corrupt step message (payload too short)")
            flat = self.payload[self.offset:self.offset + numel]
            self.offset += numel
            return _from_int64(flat, dtype, shape)
        if tag == _OBJ:
            code = self._next()
            cls = WIRE_TYPES.get(code)
            if cls is None:
                raise ValueError(f"step message of an unknown type (code {code}): are all ranks "
                                 f"running the same sageLLM?")
            fields = dataclasses.fields(cls)
            if self._next() != len(fields):
                raise ValueError(f"{cls.__name__} has a different shape on the sending rank: "
                                 f"are all ranks running the same sageLLM?")
            return cls(**{f.name: self.read() for f in fields})
        raise ValueError(f"corrupt step message (tag {tag})")


def encode(obj: Any, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """``obj`` -> (schema ints, int64 payload on ``device``)."""
    enc = _Encoder()
    enc.add(obj)
    if enc.tensors:
        payload = torch.cat([t.to(device, non_blocking=True) for t in enc.tensors])
    else:
        payload = torch.empty(0, dtype=torch.int64, device=device)
    return enc.schema, payload


def decode(schema: list[int], payload: torch.Tensor) -> Any:
    dec = _Decoder(schema, payload)
    obj = dec.read()
    if dec.pos != len(schema) or dec.offset != payload.numel():
        raise ValueError("corrupt step message (lengths do not add up)")
    return obj


class Channel:
    """Commands with an optional message, from ``src`` to every other rank of ``comm``.

    Collective: every rank calls :meth:`send` (``src``) or :meth:`recv` (the others) in the same
    order.
    """

    def __init__(self, comm: CommBackend, src: int = 0) -> None:
        self.comm = comm
        self.src = src
        self.device = comm.device

    def send(self, command: int, obj: Any = None) -> None:
        schema, payload = encode(obj, self.device)
        header = torch.tensor([command, len(schema), payload.numel()], dtype=torch.int64)
        self.comm.broadcast(header.to(self.device), src=self.src)
        body = torch.cat([torch.tensor(schema, dtype=torch.int64).to(self.device, non_blocking=True),
                          payload])
        self.comm.broadcast(body, src=self.src)

    def recv(self) -> tuple[int, Any]:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        command, schema_len, payload_len = self.comm.broadcast(header, src=self.src).tolist()
        body = torch.empty(schema_len + payload_len, dtype=torch.int64, device=self.device)
        self.comm.broadcast(body, src=self.src)
        schema = body[:schema_len].tolist()
        return command, decode(schema, body[schema_len:])
