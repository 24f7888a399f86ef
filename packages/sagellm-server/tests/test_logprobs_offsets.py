"""``text_offset`` of completions logprobs stays inside the text it indexes, whatever the token
strings add up to."""

from __future__ import annotations

from sagellm.outputs import TokenLogprob
from sagellm_server.logprobs_format import CompletionLogprobs


class _Table:
    """Token 0 is half of a two-byte character (shown as U+FFFD), 1 the other half, 2 'ab'."""

    texts = {0: "\ufffd", 1: "\ufffd", 2: "ab", 3: "</s>"}

    def text(self, token_id: int) -> str:
        return self.texts[token_id]


def _lp(t: int) -> TokenLogprob:
    return TokenLogprob(t, -0.1, 1, ((t, -0.1),))


def test_offsets_are_anchored_to_each_pieces_text() -> None:
    lp = CompletionLogprobs(_Table())  # type: ignore[arg-type]
    # "é" (one character) from two tokens whose strings are one replacement character each.
    first = lp.piece([0, 1], [_lp(0), _lp(1)], "é")
    second = lp.piece([2], [_lp(2)], "ab")
    assert first["text_offset"] == [0, 1]
    assert second["text_offset"] == [1]  # not 2: the text so far is one character long


def test_a_cut_stop_string_does_not_push_offsets_past_the_text() -> None:
    lp = CompletionLogprobs(_Table())  # type: ignore[arg-type]
    piece = lp.piece([2, 3], [_lp(2), _lp(3)], "ab")  # "</s>" matched a stop string, cut
    assert piece["text_offset"] == [0, 2]
    assert lp.piece([2], [_lp(2)], "ab")["text_offset"] == [2]


def test_without_text_offsets_follow_the_token_strings() -> None:
    lp = CompletionLogprobs(_Table())  # type: ignore[arg-type]
    assert lp.piece([2, 2], [None, _lp(2)])["text_offset"] == [0, 2]
