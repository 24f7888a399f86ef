"""Tool-call parsers: fed a character at a time they give what the whole text gives at once."""

from __future__ import annotations

import json

import pytest

from sagellm_server.tool_parsers import PARSERS, detect_style

CASES = [
    ("hermes", 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": "}", "b": [1, {"c": 2}]}}\n</tool_call>'
     '<tool_call>{"name": "g", "arguments": {}}</tool_call> done', ["f", "g"], "Sure.  done"),
    ("hermes", "no calls at all <tool_c", [], "no calls at all <tool_c"),
    ("hermes", "<tool_call>not json</tool_call>", [], "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "late"}</tool_call>', ["late"], None),
    ("hermes", '<tool_call>{"name": "cut", "arguments": {"x": ', ["cut"], None),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
     ["f", "g"], None),
    ("llama3_json", '  {"name": "f", "parameters": {"q": "a;b"}}', ["f"], None),
    ("llama3_json", "Hello {not a call}", [], "Hello {not a call}"),
    ("llama3_json", '{"answer": 42}', [], '{"answer": 42}'),
]


@pytest.mark.parametrize("style,text,names,content", CASES)
def test_streaming_matches_whole(style: str, text: str, names: list[str], content: str | None) -> None:
    whole_content, calls = PARSERS[style]().parse(text)
    assert [c.name for c in calls] == names
    assert whole_content == content
    p = PARSERS[style]()
    events = [p.feed(ch) for ch in text] + [p.finish()]
    assert "".join(e.content for e in events) == (content or "")
    args: dict[int, str] = {}
    got_names: list[str] = []
    for e in events:
        for d in e.calls:
            if d.name is not None:
                assert d.id is not None
                got_names.append(d.name)
            args[d.index] = args.get(d.index, "") + d.arguments
    assert got_names == names
    for i, c in enumerate(p.calls):
        assert args[i] == c.arguments == calls[i].arguments
        if style != "hermes" or c.name != "cut":
            json.loads(c.arguments)


def test_detect_style() -> None:
    assert detect_style("... <tool_call> ...") == "hermes"
    assert detect_style("... <|python_tag|> ...") == "llama3_json"
    assert detect_style("{{ messages }}") is None
