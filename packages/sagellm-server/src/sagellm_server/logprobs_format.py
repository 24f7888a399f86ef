"""The engine's per-token logprobs (``sagellm.outputs.TokenLogprob``) in OpenAI's two formats.

Chat: ``choices[].logprobs.content``, one ``{token, logprob, bytes, top_logprobs}`` per token.
Completions: ``choices[].logprobs`` as four parallel lists, ``tokens``, ``token_logprobs``,
``top_logprobs`` (a ``{token: logprob}`` map, the chosen token included) and ``text_offset``
(where each token starts in the choice's text); with ``echo`` the prompt's tokens come first,
the very first with ``null`` (nothing precedes it to predict it from).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sagellm.outputs import TokenLogprob
from sagellm_server.token_table import TokenTable

#: What an impossible token's logprob (-inf, e.g. masked by a grammar) is reported as: JSON has
#: no infinity, and OpenAI reports -9999 for such tokens.
LOGPROB_FLOOR = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_content(table: TokenTable, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """``logprobs.content`` entries for ``entries`` (one per generated token)."""
    return [{"token": table.text(e.token_id), "logprob": _lp(e.logprob), "bytes": table.bytes(e.token_id),
             "top_logprobs": [{"token": table.text(t), "logprob": _lp(lp), "bytes": table.bytes(t)}
                              for t, lp in e.top]}
            for e in entries]


class CompletionLogprobs:
    """Builds a completion choice's ``logprobs`` piece by piece (a stream chunk per call)."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table
        self.offset = 0  # where the next token starts in the choice's text

    def piece(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
              text: str | None = None) -> dict[str, Any]:
        """The four lists for these tokens; ``entries[i]`` is None where a token has no logprob
        (the first prompt token).

        ``text`` is what these tokens add to the choice's text, where known. Token strings need
        not add up to it (a character split over two tokens, a stop string cut off, a
        tokenizer's own clean-up), so each offset is clamped to it and the next piece starts at
        its end: offsets never drift past the text they index."""
        assert len(token_ids) == len(entries), (len(token_ids), len(entries))
        table_text = self.table.text
        start = self.offset
        end = None if text is None else start + len(text)
        tokens, lps, tops, offsets = [], [], [], []
        for tid, e in zip(token_ids, entries, strict=True):
            s = table_text(tid)
            tokens.append(s)
            offsets.append(self.offset if end is None else min(self.offset, end))
            self.offset += len(s)
            if e is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(_lp(e.logprob))
            top = {table_text(t): _lp(lp) for t, lp in e.top}
            top.setdefault(s, _lp(e.logprob))
            tops.append(top)
        if end is not None:
            self.offset = end
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def skip_text(self, text: str) -> None:
        """Text in the choice that no token here accounts for (an echoed prompt without logprobs)."""
        self.offset += len(text)


def merge(pieces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several pieces as one ``logprobs`` object (a non-streaming choice)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in pieces:
        for k in out:
            out[k].extend(p[k])
    return out
