"""Incremental detokenization that never emits half a UTF-8 character or a split word piece."""

from __future__ import annotations

from sagellm.engine.sequence import Sequence

#: Prompt tokens kept as left context, so the first generated word keeps its leading space.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, seq: Sequence) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.skip_special = seq.params.skip_special_tokens
        self.prefix_offset = max(0, seq.num_prompt_tokens - CONTEXT_TOKENS)
        self.read_offset = seq.num_prompt_tokens

    def step(self, token_ids: list[int]) -> str:
        """Text added by the tokens after ``read_offset`` (empty while a character is partial)."""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(token_ids)
            return full[len(prefix):]
        return ""
