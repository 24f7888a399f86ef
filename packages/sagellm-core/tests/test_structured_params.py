"""StructuredOutputParams: exactly one constraint, every field bounded, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sagellm.sampling_params import SamplingParams
from sagellm.structured import params as mod
from sagellm.structured.params import StructuredOutputParams


def rejected(field: str | None, **kwargs: Any) -> str:
    """Assert ``StructuredOutputParams(**kwargs)`` fails at ``field`` (None: the whole model)."""
    with pytest.raises(ValidationError) as info:
        StructuredOutputParams(**kwargs)
    errors = info.value.errors()
    loc = () if field is None else (field,)
    assert [e["loc"][:1] for e in errors] == [loc], errors
    return str(errors[0]["msg"])


@pytest.mark.parametrize("kwargs, kind", [
    (dict(json_schema={"type": "object"}), "json_schema"),
    (dict(json_object=True), "json_object"),
    (dict(regex="[0-9]+"), "regex"),
    (dict(grammar='start: "a"'), "grammar"),
    (dict(choice=["yes", "no"]), "choice"),
])
def test_each_kind_alone_is_accepted(kwargs: dict[str, Any], kind: str) -> None:
    assert StructuredOutputParams(**kwargs).kind == kind


def test_exactly_one_kind() -> None:
    msg = rejected(None, regex="a", choice=["a"])
    assert "exactly one" in msg and "regex, choice" in msg
    assert "got none" in rejected(None)
    assert "got none" in rejected(None, strict=True)


def test_unknown_field_and_frozen() -> None:
    rejected("pattern", pattern="a")
    p = StructuredOutputParams(regex="a")
    with pytest.raises(ValidationError):
        p.regex = "b"  # type: ignore[misc]


def test_json_object_false_is_refused() -> None:
    assert "must be true" in rejected("json_object", json_object=False)


def test_schema_size_and_depth_bounds() -> None:
    big = {"type": "object", "description": "x" * mod.MAX_SCHEMA_BYTES}
    assert "bytes" in rejected("json_schema", json_schema=big)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(10_000):  # far past the recursion limit: must not raise RecursionError
        deep = {"type": "array", "items": deep}
    assert "levels deep" in rejected("json_schema", json_schema=deep)
    ok: dict[str, Any] = {"type": "string"}
    for _ in range(mod.MAX_SCHEMA_DEPTH - 1):
        ok = {"items": ok}
    StructuredOutputParams(json_schema=ok)


def test_schema_must_be_json() -> None:
    assert "not a JSON document" in rejected("json_schema", json_schema={"maximum": float("nan")})
    assert "not a JSON document" in rejected("json_schema", json_schema={"enum": {1, 2}})
    assert "surrogate" in rejected("json_schema", json_schema={"const": "\ud800"})


@pytest.mark.parametrize("field, limit", [("regex", mod.MAX_REGEX_BYTES),
                                          ("grammar", mod.MAX_GRAMMAR_BYTES)])
def test_text_bounds(field: str, limit: int) -> None:
    assert "bytes" in rejected(field, **{field: "a" * (limit + 1)})
    assert "empty" in rejected(field, **{field: ""})
    assert "surrogate" in rejected(field, **{field: "a\udc80"})
    StructuredOutputParams(**{field: "a" * limit})


def test_choice_bounds() -> None:
    assert "at least one" in rejected("choice", choice=[])
    assert "empty" in rejected("choice", choice=["a", ""])
    rejected("choice", choice=["a"] * (mod.MAX_CHOICES + 1))
    assert "bytes" in rejected("choice", choice=["x" * (mod.MAX_CHOICES_BYTES // 2 + 1)] * 2)


def test_cache_key_is_canonical() -> None:
    a = StructuredOutputParams(json_schema={"type": "object", "properties": {"a": {}, "b": {}}})
    b = StructuredOutputParams(json_schema={"properties": {"b": {}, "a": {}}, "type": "object"})
    assert a.cache_key() == b.cache_key()
    strict = StructuredOutputParams(json_schema=dict(a.json_schema or {}), strict=True)
    assert strict.cache_key() != a.cache_key()
    assert StructuredOutputParams(choice=["a", "b"]).cache_key() != \
        StructuredOutputParams(regex="a|b").cache_key()


def test_sampling_params_carries_it_and_round_trips() -> None:
    sp = SamplingParams(structured_output={"json_schema": {"type": "object"}, "strict": True})
    assert isinstance(sp.structured_output, StructuredOutputParams)
    # The engine process receives params as model_dump() and rebuilds them.
    assert SamplingParams.model_validate(sp.model_dump()) == sp
    with pytest.raises(ValidationError) as info:
        SamplingParams(structured_output={"regex": "a", "grammar": "start: a"})
    assert info.value.errors()[0]["loc"][0] == "structured_output"
    assert SamplingParams().structured_output is None
