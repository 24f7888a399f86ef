"""Incremental detokenization: one token at a time (the decode step's path) and several at
once give the same text, never half a UTF-8 character."""

from __future__ import annotations

import pytest

from sagellm.engine.detokenizer import IncrementalDetokenizer
from sagellm.engine.sequence import SequenceState
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama

TEXT = "héllo €uro 日本 ok"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("detok"),
                                                         tokenizer=True))


def _stream(tokenizer, chunks: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """Feed ``TEXT``'s tokens after a prompt, ``chunks[i]`` tokens per step; the pieces."""
    prompt = tokenizer("say: ").input_ids
    out_ids = tokenizer(TEXT).input_ids
    seq = SequenceState("r", prompt, SamplingParams())
    detok = IncrementalDetokenizer(tokenizer, seq)
    assert detok._stream is not None, "the byte tokenizer is a fast one"
    pieces, i = [], 0
    for n in chunks:
        for tok in out_ids[i:i + n]:
            seq.append_token(tok)
        i += n
        pieces.append(detok.step(seq.token_ids))
    assert i == len(out_ids)
    return pieces


def test_one_token_steps_give_the_text_of_multi_token_steps(tokenizer) -> None:  # type: ignore[no-untyped-def]
    n = len(tokenizer(TEXT).input_ids)
    one = _stream(tokenizer, [1] * n)
    assert "".join(one) == TEXT
    assert "" in one, "a multi-byte character spans tokens: its first bytes emit nothing"
    assert all("\ufffd" not in p for p in one)
    mixed = _stream(tokenizer, [2, 1, 3, 1] + [1] * (n - 7))
    assert "".join(mixed) == TEXT
    assert "".join(_stream(tokenizer, [n])) == TEXT
