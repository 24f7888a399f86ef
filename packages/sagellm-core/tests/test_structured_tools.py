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


# -- tool_choice "auto" with strict tools ------------------------------------------------------

STRICT = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                            "strict": True}}]


def test_avoiding_is_exactly_the_strings_without_the_word() -> None:
    import random

    from sagellm.structured.tools import avoiding

    word = "<tool_call>"
    pattern = re.compile(avoiding(word))
    rnd = random.Random(0)
    alphabet = "<tool_cal>x\n"
    samples = ["", word, "<" + word, "a" + word + "b", "<tool_callx" + word, word[:-1] + "<"]
    samples += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))
                for _ in range(4000)]
    samples += [word[:k] + rnd.choice(alphabet) + word[k:] for k in range(len(word))
                for _ in range(20)]
    for s in samples:
        assert bool(pattern.fullmatch(s)) == (word not in s), repr(s)
    for bad in ("a", "abca"):
        with pytest.raises(ValueError, match="first character occurs"):
            avoiding(bad)


def _steer(tok: Any, c: GrammarConstraint, pieces: list[Any], eos: int | None = None) -> str:
    """Decode under ``c`` with logits that strongly prefer the tokens of ``pieces`` (text, or a
    token id) in turn, then the end of the sequence; returns the text."""
    import torch

    script: list[int] = []
    for p in pieces:
        script += [p] if isinstance(p, int) else tok.encode(p, add_special_tokens=False)
    vocab = len(tok)
    eos = tok.eos_token_id if eos is None else eos
    gen = torch.Generator().manual_seed(0)

    def logits(done: list[int]) -> torch.Tensor:
        out = torch.randn(vocab, generator=gen)
        out[script[len(done)] if len(done) < len(script) else eos] += 100.0
        return out

    tokens = drive_constraint(c, vocab, logits, max_steps=256)
    return tok.decode([t for t in tokens if t != eos])


def test_auto_llama3_allows_prose_and_holds_calls_to_their_schema(smol_tok: Any) -> None:
    from sagellm.structured.tools import auto_tool_call_grammar

    params = auto_tool_call_grammar(STRICT, "llama3_json", parallel=False, tokenizer=smol_tok)
    assert params is not None
    factory = make_constraint_factory(params, smol_tok, len(smol_tok))
    assert _steer(smol_tok, factory(), ["It is sunny in Paris."]) == "It is sunny in Paris."
    good = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    assert _steer(smol_tok, factory(), [good]) == good
    # A call with the wrong argument names and a second call: the grammar keeps the first
    # call inside the schema and allows no second one (parallel_tool_calls false).
    bad = '{"name": "get_weather", "parameters": {"town": "Rome"}}; {"name": "get_weather"'
    (call,) = parse_calls(_steer(smol_tok, factory(), [bad]).strip(), "llama3_json")
    assert call["name"] == "get_weather"
    assert schema_errors(call["parameters"], WEATHER) == []


def test_auto_hermes_needs_the_tag_as_one_token(smol_tok: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from sagellm.structured.bitmask import allocate_bitmask
    from sagellm.structured.tools import auto_tool_call_grammar

    # SmolLM2 spells "<tool_call>" in several tokens: no grammar (calls stay unconstrained).
    assert auto_tool_call_grammar(STRICT, "hermes", tokenizer=smol_tok) is None
    tok = AutoTokenizer.from_pretrained(str(make_tiny_llama(tmp_path, tokenizer=True)))
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    params = auto_tool_call_grammar(STRICT, "hermes", tokenizer=tok)
    assert params is not None
    factory = make_constraint_factory(params, tok, len(tok), [2])
    assert _steer(tok, factory(), ["Sure, it is sunny."], 2) == "Sure, it is sunny."
    text = _steer(tok, factory(), ["Let me look.", open_id,
                                   '\n{"name": "get_weather", "arguments": {"zzz": 5}}\n', close_id],
                  2)
    prose, _, rest = text.partition(HERMES_OPEN)
    assert prose == "Let me look."
    (call,) = parse_calls(HERMES_OPEN + rest, "hermes")
    assert schema_errors(call["arguments"], WEATHER) == []
    # Prose never spells the tag out: after "<tool_call" in ordinary tokens, ">" is refused.
    c = factory()
    spelled = [t for ch in "Hi <tool_call" for t in tok.encode(ch, add_special_tokens=False)]
    assert all(c.accept_token(t) for t in spelled)
    mask = allocate_bitmask(1, len(tok))
    c.fill_bitmask(mask, 0)
    logits = torch.zeros(1, len(tok))
    from sagellm.engine.constraint import apply_token_bitmask

    apply_token_bitmask(logits, mask, None)
    (gt,) = tok.encode(">", add_special_tokens=False)
    assert not torch.isfinite(logits[0, gt]) and torch.isfinite(logits[0, 2])


def test_auto_refuses_malformed_tools_and_styles() -> None:
    from sagellm.structured.tools import auto_tool_call_grammar

    with pytest.raises(ValueError, match="unknown tool-call style"):
        auto_tool_call_grammar(STRICT, "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one tool"):
        auto_tool_call_grammar([], "llama3_json")


def test_auto_strict_schema_the_engine_cannot_enforce_fails_to_compile(smol_tok: Any) -> None:
    """What the server turns into a 400 naming ``tools`` before admission."""
    from sagellm.structured.tools import auto_tool_call_grammar

    loose = {"type": "object", "properties": {"n": {"type": "integer"}}, "if": {"required": ["n"]}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": loose, "strict": True}}]
    params = auto_tool_call_grammar(tools, "llama3_json")
    assert params is not None
    with pytest.raises(ValueError, match="Unimplemented keys"):
        compiler_for(smol_tok, len(smol_tok)).validate(params)


def test_auto_strict_on_the_real_model(smol_llm: Any) -> None:
    """SmolLM2 under the llama3_json auto grammar: its greedy answer is prose or a valid call;
    pushed to open with ``{`` (a logit bias), it writes a call that parses and meets the schema."""
    from sagellm.sampling_params import SamplingParams
    from sagellm.structured.tools import auto_tool_call_grammar

    tok = smol_llm.tokenizer
    params = auto_tool_call_grammar(STRICT, "llama3_json", parallel=False, tokenizer=tok)
    prompt = "Question: what is the weather in Paris?\nAnswer:"
    free = smol_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24,
                                                      structured_output=params),
                             use_tqdm=False)[0].text
    if free.lstrip().startswith("{"):
        (call,) = parse_calls(free.strip(), "llama3_json")
        assert schema_errors(call["parameters"], WEATHER) == []
    brace = tok.encode("{", add_special_tokens=False)
    assert len(brace) == 1
    out = smol_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=128,
                                                     structured_output=params,
                                                     logit_bias={brace[0]: 30.0}),
                            use_tqdm=False)[0]
    assert out.finish_reason == "stop", out.text
    (call,) = parse_calls(out.text.strip(), "llama3_json")
    assert call["name"] == "get_weather"
    assert schema_errors(call["parameters"], WEATHER) == []
