"""Grammars that force a tool call, for ``tool_choice`` ``"required"`` and a named function.

A forced call is written in the shape the model family was trained to emit, so the server's
tool-call parser reads it like a spontaneous one:

- ``"llama3_json"`` (Llama 3.x): ``{"name": "f", "parameters": {...}}``; parallel calls are
  separated by ``"; "``.
- ``"hermes"`` (Qwen2.5, Hermes): ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``;
  parallel calls follow each other, one per line.

``tools`` are OpenAI tool definitions (``{"type": "function", "function": {"name", "parameters",
"strict"?}}``); each function's arguments are constrained by its own ``parameters`` schema, and
``strict`` (default false, as in OpenAI) decides whether keywords the grammar engine cannot
enforce are refused or ignored for that function.

Under ``tool_choice`` ``"auto"``, :func:`auto_tool_call_grammar` leaves the model free to answer
in prose but holds any call it starts to the same shapes and schemas, as OpenAI does for tools
marked ``strict``: in the llama3_json style an answer that starts with ``{`` is a call, in the
Hermes style a call starts with the single ``<tool_call>`` token (prose never contains the tag;
without such a token there is no grammar, see the function).

Pass the model's ``tokenizer`` where it has the Hermes tags as single added tokens (Qwen2.5
does): the grammar then lets the model emit those tokens, as it was trained to. Without it the
tags must be spelled in ordinary tokens, and llguidance (1.9) may offer the single tag token as
the only choice for forced text and then refuse it, which fails the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sagellm.structured.compiler import json_options
from sagellm.structured.params import StructuredOutputParams

ToolCallStyle = Literal["llama3_json", "hermes"]
#: The key holding a call's arguments, per style.
ARGUMENTS_KEY: dict[str, str] = {"llama3_json": "parameters", "hermes": "arguments"}
HERMES_OPEN_TAG, HERMES_CLOSE_TAG = "<tool_call>", "</tool_call>"
HERMES_OPEN, HERMES_CLOSE = HERMES_OPEN_TAG + "\n", "\n" + HERMES_CLOSE_TAG
LLAMA3_SEPARATOR = "; "
#: The schema of a function that declares no ``parameters``: an empty argument list (OpenAI's
#: reading of an omitted ``parameters``).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def schema_for_tool_call(tools: Sequence[Mapping[str, Any]], tool_choice: str | Mapping[str, Any],
                         style: ToolCallStyle = "llama3_json") -> dict[str, Any]:
    """The JSON schema of one call object the choice allows: ``{"name", <arguments key>}``.

    ``tool_choice`` is OpenAI's value: ``"required"`` (any of ``tools``) or
    ``{"type": "function", "function": {"name": ...}}`` (that one). One function's schema is
    returned bare, several as an ``anyOf``.
    """
    schemas = [_call_schema(f, style) for f in _chosen(tools, tool_choice)]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any],
                      style: ToolCallStyle, *, parallel: bool = False,
                      tokenizer: object | None = None) -> StructuredOutputParams:
    """Structured-output params whose every sentence is a call (``parallel``: one or more calls)
    to the chosen function(s), written in ``style``; ``tokenizer`` (the model's, optional) lets
    tags that are single tokens be emitted as such.

    Raises ``ValueError`` for malformed tools, an unknown style, ``"auto"``/``"none"`` (not
    enforced by a grammar) or a named function not among ``tools``; a grammar too large for
    :class:`StructuredOutputParams` fails its validation (also a ``ValueError``).
    """
    if style not in ARGUMENTS_KEY:
        raise ValueError(f"unknown tool-call style {style!r}; expected one of "
                         f"{', '.join(ARGUMENTS_KEY)}")
    functions = _chosen(tools, choice)
    rules = [f"call_{i}: %json {_embedded(f, style)}" for i, f in enumerate(functions)]
    calls = " | ".join(f"call_{i}" for i in range(len(functions)))
    if style == "hermes":
        one = 'open "\\n" call "\\n" close'
        sep = json.dumps("\n")
        rules += [f"open: {_tag(HERMES_OPEN_TAG, tokenizer)}",
                  f"close: {_tag(HERMES_CLOSE_TAG, tokenizer)}"]
    else:
        one, sep = "call", json.dumps(LLAMA3_SEPARATOR)
    start = f"start: one ({sep} one)*" if parallel else "start: one"
    lark = "\n".join([start, f"one: {one}", f"call: {calls}", *rules])
    return StructuredOutputParams(grammar=lark)


#: Prose in the llama3_json style: anything whose first character after blanks is not ``{``
#: (an answer starting with ``{`` is a call, as the server's parser reads it).
LLAMA3_PROSE = r"/\s*[^{\s](?s:.*)/"


def avoiding(word: str) -> str:
    """A regex (Rust syntax, as llguidance reads it) for every string that does not contain
    ``word``, whose first character must occur in it only once.

    Every ``word[0]`` is either the start of a partial match that breaks on a character other
    than the next one (back to no match) or is followed straight by another ``word[0]``, or by
    the end. (llguidance 1.9's own complement and intersection operators would do this, but
    with ``~`` it refused all text and with ``&`` it never allowed the end of the sequence.)
    """
    first, rest = word[0], word[1:]
    if not rest or first in rest:
        raise ValueError(f"avoiding() needs a word of 2+ characters whose first character occurs "
                         f"once, got {word!r}")
    esc = re.escape
    prefixes = [rest[:k] for k in range(len(rest))]  # the partial matches after `first`
    def cls(*chars: str) -> str:
        return "[^" + "".join(esc(c) for c in chars) + "]"
    partial = "(?:" + "|".join(esc(p) for p in prefixes) + ")"
    broken = "(?:" + "|".join(esc(p) + cls(rest[len(p)], first) for p in prefixes) + ")"
    lead = f"(?:{esc(first)}{partial})*"
    return f"(?:{cls(first)}|{lead}{esc(first)}{broken})*{lead}"


#: Prose in the Hermes style: anything without the opening tag.
HERMES_PROSE = "/" + avoiding(HERMES_OPEN_TAG) + "/"


def auto_tool_call_grammar(tools: Sequence[Mapping[str, Any]], style: ToolCallStyle, *,
                           parallel: bool = True, tokenizer: object | None = None
                           ) -> StructuredOutputParams | None:
    """Structured-output params for ``tool_choice`` ``"auto"``: prose, or calls (``parallel``:
    one or more) to any of ``tools`` in ``style`` whose arguments follow their schemas; in the
    Hermes style prose may come before the calls.

    ``None`` in the Hermes style when ``tokenizer`` has no single token for ``<tool_call>``:
    the prose-or-call boundary is then a spelled-out tag the grammar engine's longest-match
    lexer cannot split from the prose before it. Raises ``ValueError`` as
    :func:`tool_call_grammar` does for malformed tools or an unknown style.
    """
    if style not in ARGUMENTS_KEY:
        raise ValueError(f"unknown tool-call style {style!r}; expected one of "
                         f"{', '.join(ARGUMENTS_KEY)}")
    functions = _chosen(tools, "required")
    rules = [f"call_{i}: %json {_embedded(f, style)}" for i, f in enumerate(functions)]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
    if style == "hermes":
        open_id = _single_token(HERMES_OPEN_TAG, tokenizer)
        if open_id is None:
            return None
        sep = json.dumps("\n")
        rules += ["prose: " + HERMES_PROSE, 'one: open "\\n" call "\\n" close',
                  f"open: <[{open_id}]>", f"close: {_tag(HERMES_CLOSE_TAG, tokenizer)}",
                  "start: prose | prose calls | calls"]
    else:
        sep = json.dumps(LLAMA3_SEPARATOR)
        rules += ["prose: " + LLAMA3_PROSE, "one: call", "start: prose | calls"]
    rules.append(f"calls: one ({sep} one)*" if parallel else "calls: one")
    return StructuredOutputParams(grammar="\n".join(rules))


def _single_token(tag: str, tokenizer: object | None) -> int | None:
    """The id of the one token that spells ``tag``, or ``None``."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    tid = convert(tag)
    if not isinstance(tid, int) or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid if tokenizer.decode([tid]) == tag else None  # type: ignore[attr-defined]


def _tag(tag: str, tokenizer: object | None) -> str:
    """A Lark expression for ``tag``: its text, or the one token that spells it, if any."""
    text = json.dumps(tag)
    tid = _single_token(tag, tokenizer)
    return text if tid is None else f"{text} | <[{tid}]>"


def _embedded(function: Mapping[str, Any], style: ToolCallStyle) -> str:
    # A %json block reads its compile options from the schema's "x-guidance" key.
    schema = {**_call_schema(function, style),
              "x-guidance": json_options(bool(function.get("strict", False)))}
    return json.dumps(schema, ensure_ascii=False, allow_nan=False)


def _call_schema(function: Mapping[str, Any], style: ToolCallStyle) -> dict[str, Any]:
    args = ARGUMENTS_KEY[style]
    params = dict(function.get("parameters") or NO_PARAMETERS)
    return {"type": "object",
            "properties": {"name": {"const": function["name"]}, args: params},
            "required": ["name", args], "additionalProperties": False}


def _chosen(tools: Sequence[Mapping[str, Any]],
            choice: str | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The function definitions ``choice`` allows, checked."""
    functions = [_function(t, i) for i, t in enumerate(tools)]
    if not functions:
        raise ValueError("tool_choice needs at least one tool")
    names = [f["name"] for f in functions]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"tools: function {dup!r} is defined twice")
    if choice == "required":
        return functions
    if isinstance(choice, str):
        raise ValueError(f"tool_choice {choice!r} is not enforced by a grammar; only 'required' "
                         "and a named function are")
    fn = choice.get("function") if isinstance(choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError('tool_choice must be "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    if name not in names:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools "
                         f"({', '.join(names)})")
    return [functions[names.index(name)]]


def _function(tool: Mapping[str, Any], i: int) -> Mapping[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, Mapping) or tool.get("type") != "function":
        raise ValueError(f'{where}: only tools of type "function" are supported')
    fn = tool.get("function")
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}.function must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1 to 64 letters, digits or _.:-, got "
                         f"{name!r}")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    return fn
