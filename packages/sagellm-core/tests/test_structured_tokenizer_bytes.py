"""The grammar engine reads a tokenizer's tokens as the tokenizer itself does.

transformers 5.17's GGUF converter gives the embedded SmolLM2 (byte-level BPE) ``byte_fallback``
and a sentencepiece-style decoder; the tokenizer still works, but llguidance then read ``Ġ``
(token 216, a space) as two literal bytes: a regex starting with a space allowed token 216 in
its mask and refused it when consumed (seen on the H200 image). ``byte_level_consistent`` hands
such a tokenizer over as byte-level, and a check refuses any tokenizer the grammar engine still
reads differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest

from sagellm.structured.tokenizer import _check_token_bytes, byte_level_consistent, guidance_tokenizer

SPACE = 216  # "Ġ" in SmolLM2's vocabulary


def _as_converted_by_517(tok: Any) -> str:
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    return json.dumps(spec)


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def tok_517(smol_tok: Any) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_as_converted_by_517(smol_tok)),
                                  eos_token="<|im_end|>")
    assert tok.decode([SPACE, 34]) == " 2" and tok(" 2023").input_ids[0] == SPACE  # it still works
    return tok


def test_a_byte_level_tokenizer_with_byte_fallback_is_handed_over_as_byte_level(smol_tok: Any) -> None:
    fixed = json.loads(byte_level_consistent(_as_converted_by_517(smol_tok)))
    assert fixed["model"]["byte_fallback"] is False and fixed["decoder"]["type"] == "ByteLevel"
    # Nothing else changes, and a consistent tokenizer is returned as it came.
    plain = smol_tok.backend_tokenizer.to_str()
    assert byte_level_consistent(plain) == plain
    assert fixed["model"]["vocab"] == json.loads(plain)["model"]["vocab"]


def test_a_sentencepiece_bpe_with_byte_fallback_is_left_alone() -> None:
    spec = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"},
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}}
    js = json.dumps(spec)
    assert byte_level_consistent(js) == js
    nested = dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split"}, {"type": "ByteLevel", "add_prefix_space": False}]})
    assert json.loads(byte_level_consistent(json.dumps(nested)))["model"]["byte_fallback"] is False


def test_a_regex_starting_with_a_space_accepts_the_space_token(tok_517: Any) -> None:
    gt = guidance_tokenizer(tok_517, 49152, [2])
    assert gt.ll.decode_bytes([SPACE]) == b" "
    matcher = llguidance.LLMatcher(gt.ll, llguidance.LLMatcher.grammar_from_regex(r" [12][0-9]{3}"))
    for t in (SPACE, 34, 32, 34, 35):  # " 2023"
        assert matcher.consume_token(t), matcher.get_error()
    assert not matcher.is_error()


def test_a_tokenizer_the_grammar_engine_misreads_is_refused(smol_tok: Any, tok_517: Any) -> None:
    misread = llguidance.LLTokenizer(_as_converted_by_517(smol_tok), n_vocab=49152, eos_token=[2])
    with pytest.raises(ValueError, match="reads this tokenizer's tokens differently"):
        _check_token_bytes(misread, tok_517)
    _check_token_bytes(guidance_tokenizer(smol_tok, 49152, [2]).ll, smol_tok)  # the real one passes
