"""Incremental detokenization that never emits half a UTF-8 character or a split word piece.

Fast (Rust) tokenizers use ``tokenizers``' own ``DecodeStream`` (a couple of microseconds per
token); other tokenizers fall back to decoding a sliding window of ids.
"""

from __future__ import annotations

from sagellm.engine.sequence import SequenceState

#: Prompt tokens kept as left context, so the first generated word keeps its leading space.
CONTEXT_TOKENS = 5


def _decode_stream(tokenizer, seq: SequenceState, skip_special: bool):  # type: ignore[no-untyped-def]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # pragma: no cover - tokenizers older than 0.21
        return None, None
    context = seq.token_ids[max(0, seq.num_prompt_tokens - CONTEXT_TOKENS):seq.num_prompt_tokens]
    try:
        stream = DecodeStream(context, skip_special_tokens=skip_special)
    except TypeError:  # pragma: no cover - versions without a prefix argument
        stream = DecodeStream(skip_special_tokens=skip_special)
    return backend, stream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, seq: SequenceState) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.skip_special = seq.params.skip_special_tokens
        self.prefix_offset = max(0, seq.num_prompt_tokens - CONTEXT_TOKENS)
        self.read_offset = seq.num_prompt_tokens
        self._backend, self._stream = _decode_stream(tokenizer, seq, self.skip_special)

    def step(self, token_ids: list[int]) -> str:
        """Text added by the tokens after those already read (empty while a character is partial)."""
        if self._stream is not None:
            if len(token_ids) == self.read_offset + 1:  # one new token: the decode step
                piece = self._stream.step(self._backend, token_ids[-1])
                self.read_offset += 1
                return piece or ""
            out = []
            for tok in token_ids[self.read_offset:]:
                piece = self._stream.step(self._backend, tok)
                if piece:
                    out.append(piece)
            self.read_offset = len(token_ids)
            return "".join(out)
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(token_ids)
            return full[len(prefix):]
        return ""
