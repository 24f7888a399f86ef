"""What a request asks its output to match: a JSON schema, any JSON object, a regex, a grammar
or one of a list of strings.

Everything a client sends here is bounded on construction (each limit one module constant), so
an oversized or absurdly nested value fails as a pydantic ``ValidationError`` whose location
names the field (the server answers HTTP 400) before any grammar is built. Whether the value is a
*valid* schema, regex or grammar is decided by the grammar engine, in
``sagellm.structured.compiler``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Serialised size bounds (UTF-8 bytes). A schema of real use fits in a few KiB; these keep a
#: hostile request from costing the grammar engine more than a few milliseconds to compile.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_REGEX_BYTES = 16 * 1024
#: Containers nested inside the schema document (each object level of the described value
#: costs about two: ``properties`` and the property's schema).
MAX_SCHEMA_DEPTH = 64
MAX_CHOICES = 1024
MAX_CHOICES_BYTES = 64 * 1024

StructuredKind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]
KINDS: tuple[StructuredKind, ...] = ("json_schema", "json_object", "regex", "grammar", "choice")


class StructuredOutputParams(BaseModel):
    """Exactly one of the constraint fields, plus ``strict``.

    - ``json_schema``: the output is one JSON value valid against the schema.
    - ``json_object``: the output is any JSON object (``True``; ``False`` is refused).
    - ``regex``: the whole output matches the regular expression (Rust ``regex`` syntax).
    - ``grammar``: the output is a sentence of the Lark grammar (llguidance's dialect, which may
      embed ``%json {...}`` schemas); the start rule is ``start``.
    - ``choice``: the output is exactly one of the strings.

    ``strict`` applies to JSON schemas: ``True`` refuses a schema that uses a keyword the grammar
    engine cannot enforce (``if``/``then``, ``not``, ``contains``, ...), ``False`` enforces the rest
    and ignores those keywords (OpenAI's default).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_schema: dict[str, Any] | None = None
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = Field(None, max_length=MAX_CHOICES)
    strict: bool = False

    @field_validator("json_schema")
    @classmethod
    def _schema_bounds(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        # Depth first: serialising a 10**5-deep document would hit the recursion limit.
        depth = _depth(v)
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} "
                             "are allowed")
        try:
            text = json.dumps(v, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schema is not a JSON document: {exc}") from None
        _check_size("the schema", _utf8_len("the schema", text), MAX_SCHEMA_BYTES)
        return v

    @field_validator("json_object")
    @classmethod
    def _json_object_true(cls, v: bool | None) -> bool | None:
        if v is False:
            raise ValueError("json_object must be true (leave it out for no constraint)")
        return v

    @field_validator("regex")
    @classmethod
    def _regex_bounds(cls, v: str | None) -> str | None:
        if v is not None:
            _check_nonempty_text("regex", v, MAX_REGEX_BYTES)
        return v

    @field_validator("grammar")
    @classmethod
    def _grammar_bounds(cls, v: str | None) -> str | None:
        if v is not None:
            _check_nonempty_text("grammar", v, MAX_GRAMMAR_BYTES)
        return v

    @field_validator("choice")
    @classmethod
    def _choice_bounds(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("choice must list at least one string")
        if any(s == "" for s in v):
            raise ValueError("choice strings must not be empty")
        _check_size("the choices", sum(_utf8_len("a choice", s) for s in v), MAX_CHOICES_BYTES)
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputParams:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        return self

    @property
    def kind(self) -> StructuredKind:
        """The name of the one constraint field that is set."""
        return next(k for k in KINDS if getattr(self, k) is not None)

    def cache_key(self) -> str:
        """A canonical text of these params: equal for equal constraints (keys sorted)."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)


def _depth(doc: object) -> int:
    """Nesting depth of dicts and lists in ``doc``, iteratively (no recursion limit)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest  # no need to walk the rest of a hostile document
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _check_nonempty_text(what: str, v: str, limit: int) -> None:
    if not v:
        raise ValueError(f"{what} must not be empty")
    _check_size(f"the {what}", _utf8_len(f"the {what}", v), limit)


def _utf8_len(what: str, v: str) -> int:
    try:
        return len(v.encode())
    except UnicodeEncodeError:
        # A lone surrogate (JSON can carry "\ud800") has no UTF-8 form for the engine to match.
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate)") from None


def _check_size(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise ValueError(f"{what} is {size} bytes; at most {limit} are allowed")
