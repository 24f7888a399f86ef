"""Tool-call grammars: every sentence is a call to a chosen function, in the family's shape, with
arguments valid against the function's schema; malformed tools are refused clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sagellm.structured.compiler import compiler_for
from sagellm.structured.constraint import GrammarConstraint
from sagellm.structured.factory import make_constraint_factory
from sagellm.structured.tools import (
    ARGUMENTS_KEY,
    HERMES_CLOSE,
    HERMES_OPEN,
    NO_PARAMETERS,
    schema_for_tool_call,
    tool_call_grammar,
)
from sagellm.testing.structured import (
    drive_constraint,
    random_logits,
    schema_errors,
    whitespace_penalty,
)
from sagellm.testing.tiny_model import make_tiny_llama

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now"}},
]
PARAMS = {"get_weather": WEATHER, "now": NO_PARAMETERS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def parse_calls(text: str, style: str) -> list[dict[str, Any]]:
    """Tool calls out of model text, as a tool-call parser for ``style`` reads them."""
    if style == "hermes":
        bodies = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, flags=re.S)
        assert "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies) == text
        return [json.loads(b) for b in bodies]
    dec, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        call, end = dec.raw_decode(text, pos + (len(text[pos:]) - len(text[pos:].lstrip())))
        calls.append(call)
        pos = end + (2 if text.startswith("; ", end) else 0)
    return calls


@pytest.fixture(scope="module")
def less_whitespace(smol_tok: Any) -> Any:
    return whitespace_penalty(smol_tok, len(smol_tok))


def decode(tok: Any, c: GrammarConstraint, seed: int, bias: Any) -> str:
    vocab = len(tok)
    tokens = drive_constraint(c, vocab, random_logits(vocab, seed, bias), max_steps=1024)
    return tok.decode(tokens[:-1] if tokens[-1] == tok.eos_token_id else tokens)


@pytest.mark.parametrize("style", ["llama3_json", "hermes"])
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("parallel", [False, True], ids=["one", "parallel"])
def test_forced_calls_parse_and_validate(smol_tok: Any, less_whitespace: Any, style: str,
                                         choice: Any, parallel: bool) -> None:
    params = tool_call_grammar(TOOLS, choice, style, parallel=parallel,  # type: ignore[arg-type]
                               tokenizer=smol_tok)
    for seed in range(2):
        c = make_constraint_factory(params, smol_tok, len(smol_tok))()
        text = decode(smol_tok, c, seed, less_whitespace)
        calls = parse_calls(text, style)
        assert calls and (parallel or len(calls) == 1), text
        for call in calls:
            assert set(call) == {"name", ARGUMENTS_KEY[style]}, call
            assert call["name"] in (["get_weather"] if choice is NAMED else PARAMS)
            assert schema_errors(call[ARGUMENTS_KEY[style]], PARAMS[call["name"]]) == []


def test_call_schema_shapes() -> None:
    one = schema_for_tool_call(TOOLS, NAMED, "hermes")
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER and one["required"] == ["name", "arguments"]
    both = schema_for_tool_call(TOOLS, "required")
    assert [s["properties"]["name"]["const"] for s in both["anyOf"]] == ["get_weather", "now"]
    assert both["anyOf"][1]["properties"]["parameters"] == NO_PARAMETERS
    assert schema_errors({"name": "now", "parameters": {}}, both) == []
    assert schema_errors({"name": "now", "arguments": {}}, both) != []


def test_hermes_tags_may_be_single_added_tokens(tmp_path: Path) -> None:
    # Qwen2.5 has "<tool_call>" as one added (non-special) token: the grammar must let the model
    # emit that token rather than force it to spell the tag byte by byte.
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tiny_llama(tmp_path, tokenizer=True)))
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    vocab = len(tok)
    params = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "now"}},
                               "hermes", tokenizer=tok)
    assert f"<[{open_id}]>" in (params.grammar or "")
    c = make_constraint_factory(params, tok, vocab, [2])()
    gen = torch.Generator().manual_seed(0)

    def logits(_: Any) -> torch.Tensor:
        out = torch.randn(vocab, generator=gen)
        out[[open_id, close_id]] += 100.0  # the model strongly prefers the tag tokens
        return out

    tokens = drive_constraint(c, vocab, logits)
    assert tokens[0] == open_id and close_id in tokens
    text = tok.decode([t for t in tokens if t != 2])
    assert text.startswith(HERMES_OPEN) and text.endswith(HERMES_CLOSE)
    assert parse_calls(text, "hermes") == [{"name": "now", "arguments": {}}]


def test_function_strictness_is_per_function(smol_tok: Any) -> None:
    loose = {"type": "object", "properties": {"n": {"type": "integer"}}, "if": {"required": ["n"]}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": loose}}]
    compiler = compiler_for(smol_tok, len(smol_tok))
    compiler.validate(tool_call_grammar(tools, "required", "llama3_json"))
    tools[0]["function"]["strict"] = True  # type: ignore[index]
    with pytest.raises(ValueError, match="Unimplemented keys"):
        compiler.validate(tool_call_grammar(tools, "required", "llama3_json"))


@pytest.mark.parametrize("tools, choice, style, problem", [
    (TOOLS, "auto", "hermes", "not enforced by a grammar"),
    (TOOLS, "none", "hermes", "not enforced by a grammar"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "hermes", "not among the tools"),
    (TOOLS, {"type": "function"}, "hermes", "tool_choice must be"),
    (TOOLS, {"type": "other", "function": {"name": "now"}}, "hermes", "tool_choice must be"),
    (TOOLS, "required", "pythonic", "unknown tool-call style"),
    ([], "required", "hermes", "at least one tool"),
    ([TOOLS[1], TOOLS[1]], "required", "hermes", "defined twice"),
    ([{"type": "retrieval"}], "required", "hermes", 'type "function"'),
    ([{"type": "function", "function": "now"}], "required", "hermes", "must be an object"),
    ([{"type": "function", "function": {"name": "a b"}}], "required", "hermes", "name must be"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "required", "hermes", "name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "required", "hermes",
     "JSON schema object"),
])
def test_malformed_tools_are_refused(tools: Any, choice: Any, style: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        tool_call_grammar(tools, choice, style)


def test_too_many_tools_fail_the_size_bound() -> None:
    big = {"type": "object", "properties": {f"a{i}": {"type": "string"} for i in range(400)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}}
             for i in range(10)]
    with pytest.raises(ValueError, match="bytes"):
        tool_call_grammar(tools, "required", "hermes")
