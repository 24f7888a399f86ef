"""Each token id's text and raw bytes, as the logprobs of a response name them.

Decoding one token at a time goes wrong for tokens that hold part of a UTF-8 character (a
byte-level BPE splits "é" over two tokens): each decodes to U+FFFD. OpenAI's ``bytes`` field
exists for that, so the table keeps every token's exact bytes, read from the tokenizer's own
byte mapping (GPT-2-style byte-level vocabularies, SentencePiece's ``<0xNN>`` pieces and its
``▁`` space), and a text made from them. It is built once, in a worker thread, on first use.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of the byte-to-character map byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the other bytes for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return "decode"
    try:
        state = json.dumps(json.loads(decoder.__getstate__()))
    except Exception:  # a decoder that does not serialize: fall back to decode()
        return "decode"
    if '"ByteLevel"' in state:
        return "byte_level"
    if '"ByteFallback"' in state or '"Metaspace"' in state:
        return "sentencepiece"
    return "decode"


class TokenTable:
    """``text(id)`` and ``bytes(id)`` for every token of the vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        kind = _decoder_kind(tokenizer)
        ids = list(range(vocab_size))
        self._bytes: list[bytes] = []
        if kind == "decode":
            self._bytes = [tokenizer.decode([i]).encode() for i in ids]
        else:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            table = _byte_level_decoder() if kind == "byte_level" else None
            for i, piece in enumerate(pieces):
                self._bytes.append(self._piece_bytes(tokenizer, i, piece, table))
        self._text = [b.decode("utf-8", errors="replace") for b in self._bytes]

    @staticmethod
    def _piece_bytes(tokenizer: Any, token_id: int, piece: str | None,
                     table: dict[str, int] | None) -> bytes:
        if piece is None:  # an id past the tokenizer's vocabulary (padded embeddings)
            return b""
        if table is not None:
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return tokenizer.decode([token_id]).encode()  # added tokens are stored as text
        m = _SP_BYTE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace(_SP_SPACE, " ").encode()

    def __len__(self) -> int:
        return len(self._text)

    def text(self, token_id: int) -> str:
        return self._text[token_id] if 0 <= token_id < len(self._text) else ""

    def bytes(self, token_id: int) -> list[int]:
        return list(self._bytes[token_id]) if 0 <= token_id < len(self._bytes) else []
