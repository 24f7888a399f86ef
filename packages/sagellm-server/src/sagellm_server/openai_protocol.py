"""Request models of the OpenAI API subset we serve, and the OpenAI error object.

Requests are validated with pydantic; responses are plain dicts (and, for streaming, strings
assembled around a pre-serialized prefix) because they are built once per token.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator


class ApiError(Exception):
    """Becomes ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first offending field (``messages.0.role`` style in the message)."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    # Union members show up in ``loc`` as type names ("str", "list[int]"); keep real fields only.
    path = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    param = path[0] if path else None
    where = ".".join(path) if path else "body"
    msg = err.get("msg", "invalid value")
    return ApiError(400, f"invalid value for '{where}': {msg}", param=param, code="invalid_value")


#: A JSON escape of a UTF-16 surrogate (\\uD800-\\uDFFF): the only way one gets into a str.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it.

    Stricter than ``json.loads``: no NaN/Infinity, no numbers that overflow to infinity, no
    nesting deep enough to exhaust the stack, and no lone surrogates (which JSON's escapes
    allow but Unicode does not: tokenizers and our own JSON responses would fail on them)."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):
        path = _surrogate_path(obj)
        if path is not None:
            where = ".".join(path) or "body"
            raise ApiError(400, f"invalid value for '{where}': it contains a lone UTF-16 surrogate "
                           "escape (\\ud800-\\udfff), which is not valid Unicode",
                           param=path[0] if path and path[0] != _KEY else None, code="invalid_value")
    return obj


_KEY = "(a key)"


def _surrogate_path(obj: Any) -> list[str] | None:
    """Where the first string (or key) with a lone surrogate is; iterative, as nesting is deep."""
    todo: list[tuple[Any, list[str]]] = [(obj, [])]
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                if _SURROGATE.search(k):
                    return [*path, _KEY]
                todo.append((v, [*path, k]))
        elif isinstance(value, list):
            todo.extend((v, [*path, str(i)]) for i, v in reversed(list(enumerate(value))))
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _CommonRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send many we do not use (user, metadata, ...).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # Beyond int64 these overflow the sampler's tensors: refuse them here, as a 400.
    top_k: int | None = Field(None, le=2**31 - 1)
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generators take
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    n: int = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    #: Extension: return the generated token ids with each choice (and each stream chunk).
    return_token_ids: StrictBool = False

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError("top_k must be -1 or 0 (disabled) or a positive integer")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop strings must not be empty")
        return v

    def check_supported(self) -> None:
        """Reject what we parse but do not implement, rather than silently ignoring it."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: this server returns one choice per "
                           "prompt (n=1)", param="n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported", param=name, code="unsupported_value")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true",
                           param="stream_options", code="invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_CommonRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: StrictBool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v:
                raise ValueError("the prompt is empty")
        elif not v:
            raise ValueError("the prompt list is empty")
        elif isinstance(v[0], (str, list)) and any(len(p) == 0 for p in v):
            raise ValueError("one of the prompts is empty")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_value")
        if self.logprobs:
            raise ApiError(400, "logprobs is not supported", param="logprobs", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of", code="unsupported_value")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_value")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.name:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True
    chat_template: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise ApiError(400, "logprobs is not supported", param="logprobs", code="unsupported_value")
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported_value")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
