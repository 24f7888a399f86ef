"""Request models of the OpenAI chat and completions APIs, and the OpenAI error object.

Every field of the two request bodies is declared here, so nothing is silently ignored: a field
is honoured, accepted as a no-op only where it cannot change the output (``user``), or refused
with a 400 naming it (``check_supported``); fields we do not know are refused too (``extra
"forbid"``; the server's ``--lenient-request-fields`` drops unknown top-level fields instead).
Requests are validated with pydantic; responses are plain dicts (and, for streaming, strings
assembled around a pre-serialized prefix) because they are built once per token.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from sagellm.sampling_params import MAX_ABS_PENALTY, MAX_REPETITION_PENALTY, MAX_SEED, MIN_SEED


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
    if err.get("type") == "extra_forbidden":
        where = ".".join(loc) or "body"
        return ApiError(400, f"unknown field '{where}': this server refuses fields it does not "
                        "implement (start it with --lenient-request-fields to ignore unknown "
                        "top-level fields)", param=loc[0] if loc else None, code="unknown_field")
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


# -- limits on what one request may ask for (each one fact, here) ----------------------------

#: Choices per request (``n``, times the prompts of a completion): each is a sequence in the batch.
MAX_CHOICES = 128
#: ``top_logprobs`` (chat) and ``logprobs`` (completions): alternatives per token, as in OpenAI.
MAX_TOP_LOGPROBS = 20
#: ``logit_bias`` entries; OpenAI's values range over [-100, 100].
MAX_LOGIT_BIAS = 1024
#: Tools per request (OpenAI's limit) and nesting of a tool's ``parameters`` or a JSON schema.
MAX_TOOLS = 128
MAX_SCHEMA_DEPTH = 32
#: ``metadata``: OpenAI's shape (16 pairs, 64-character keys, 512-character values).
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
#: ``user``, ``safety_identifier``, ``prompt_cache_key``, ``cache_salt``.
MAX_ID_CHARS = 512
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: the body parser already bounds recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in v)
    return deepest


def _shallow(value: Any, what: str) -> Any:
    if _depth(value) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    #: OpenAI pads chunks with random text against side channels; we never do, so either is fine.
    include_obfuscation: StrictBool | None = None


# -- tools -------------------------------------------------------------------------------------


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    #: Honoured: a tool call is parsed from the model's output; with tool_choice required or a
    #: named function the call is generated under that function's schema in any case, and
    #: under auto when any tool is strict (``request_params._strict_auto_tools``).
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FUNCTION_NAME.match(v):
            raise ValueError("a function name is 1 to 64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _shallow(v, "the function's parameters") if v is not None else v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


# -- messages ----------------------------------------------------------------------------------


class TextPart(_Strict):
    """The only content part we take: this server serves text models (images, audio and files
    are refused by the ``type`` literal, naming the part)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    #: assistant: the calls it made earlier in the conversation.
    tool_calls: list[ToolCall] | None = None
    #: tool: which call this message answers.
    tool_call_id: str | None = None
    #: assistant: a refusal it gave (rendered as its content).
    refusal: str | None = None
    # Refused when set: they carry what a text model cannot take or give back.
    function_call: Any = None
    audio: Any = None

    def check(self, where: str) -> None:
        for name in ("function_call", "audio"):
            if getattr(self, name) is not None:
                raise ApiError(400, f"'{where}.{name}' is not supported (this server serves text "
                               "models; send tool_calls for function calls)", param="messages",
                               code="unsupported_value")
        if self.tool_calls and self.role != "assistant":
            raise ApiError(400, f"'{where}.tool_calls' is only allowed on assistant messages",
                           param="messages", code="invalid_value")
        if self.role == "tool" and not self.tool_call_id:
            raise ApiError(400, f"'{where}.tool_call_id' is required on tool messages",
                           param="messages", code="invalid_value")

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        if not content and self.refusal:
            content = self.refusal
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.name:
            msg["name"] = self.name
        if self.tool_calls:
            # Chat templates index arguments as a mapping (HF convention); send JSON, get a dict.
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id:
            msg["tool_call_id"] = self.tool_call_id
        return msg


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- response_format and the structured-output extension ---------------------------------------


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    #: The JSON schema the output must satisfy (absent: any JSON object).
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _shallow(v, "the JSON schema") if v is not None else v


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """Extension (vLLM's ``structured_outputs`` shape): constrain the output to exactly one of
    these. Allowed on both routes; with ``response_format`` other than text it is refused."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    json_object: StrictBool | None = None
    regex: str | None = Field(None, max_length=8192)
    grammar: str | None = Field(None, max_length=65536)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)

    @field_validator("json_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _shallow(v, "the JSON schema") if v is not None else v


# -- the common fields of both routes ----------------------------------------------------------


class _CommonRequest(_Strict):
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # Beyond int64 these overflow the sampler's tensors: refuse them here, as a 400.
    top_k: int | None = Field(None, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)  # what torch's generators take
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    #: No-op: names the end user for abuse monitoring, which this server does not do.
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    #: Extension (vLLM's): requests with different salts never share cached prefix KV blocks.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_size(cls, v: Any) -> Any:
        # Before pydantic walks a million entries: the count is all it takes to refuse them.
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(v)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ValueError(f"the key {key[:40]!r} is not a token id (a non-negative integer "
                                 "as a string)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias {bias} for token {key} is outside [-100, 100]")
        return v

    def check_supported(self) -> None:
        """Refuse values we parse but do not implement (rather than silently ignoring them)."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true",
                           param="stream_options", code="invalid_value")
        if self.n * self.num_prompts > MAX_CHOICES:
            raise ApiError(400, f"n={self.n} for {self.num_prompts} prompts asks for "
                           f"{self.n * self.num_prompts} choices; at most {MAX_CHOICES} are allowed",
                           param="n", code="invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_prompts(self) -> int:
        raise NotImplementedError

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        """``logit_bias`` keyed by token id, each inside the vocabulary (else a 400)."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            tid = int(key)
            if tid >= vocab_size:
                raise ApiError(400, f"logit_bias names token {tid}, outside the vocabulary "
                               f"(0..{vocab_size - 1})", param="logit_bias", code="invalid_value")
            out[tid] = bias
        return out


def _refuse(req: BaseModel, refused: dict[str, str]) -> None:
    for name, why in refused.items():
        if getattr(req, name) is not None:
            raise ApiError(400, f"'{name}' is not supported: {why}", param=name,
                           code="unsupported_value")


# -- completions -------------------------------------------------------------------------------

#: Completion fields refused whenever they are set, and why.
COMPLETION_REFUSED = {
    "suffix": "this server does not do fill-in-the-middle insertion",
}


class CompletionRequest(_CommonRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    #: 0 only with echo (the prompt's logprobs alone: what evaluation harnesses ask for).
    max_tokens: int | None = Field(None, ge=0)
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
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
        _refuse(self, COMPLETION_REFUSED)
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of={self.best_of} with n={self.n} is not supported: this "
                           "server returns every sequence it generates (best_of must equal n)",
                           param="best_of", code="unsupported_value")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 is only allowed with echo=true (the prompt's "
                           "logprobs without a completion)", param="max_tokens", code="invalid_value")

    @property
    def num_prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)


# -- chat --------------------------------------------------------------------------------------

#: Chat fields refused whenever they are set (not null), and why.
CHAT_REFUSED = {
    "audio": "this server serves text models (no audio output)",
    "functions": "the deprecated functions API is not served; send tools",
    "function_call": "the deprecated functions API is not served; send tool_choice",
    "moderation": "this server runs no moderation",
    "web_search_options": "this server has no web search",
    "reasoning_effort": "this server has no reasoning-effort control",
    "verbosity": "this server has no verbosity control",
    "prompt_cache_options": "prefix caching is automatic; its lifetime cannot be set per request",
    "prompt_cache_retention": "prefix caching is automatic; its lifetime cannot be set per request",
}


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    #: No-ops: routing and storage hints that cannot change the output.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = Field(None, max_length=MAX_ID_CHARS)
    prompt_cache_key: str | None = Field(None, max_length=MAX_ID_CHARS)
    #: Predicted output speeds up generation where it matches; the output is the same without it.
    prediction: dict[str, Any] | None = None
    #: Accepted when they ask for what this server does anyway (see ``check_supported``).
    store: StrictBool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    # Refused when set (CHAT_REFUSED).
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    # Extensions.
    add_generation_prompt: StrictBool = True
    chat_template: str | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > MAX_METADATA_PAIRS:
                raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs are allowed")
            if any(len(k) > MAX_METADATA_KEY or len(x) > MAX_METADATA_VALUE for k, x in v.items()):
                raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters and values "
                                 f"{MAX_METADATA_VALUE}")
        return v

    @field_validator("prediction")
    @classmethod
    def _prediction(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and (v.get("type") != "content" or set(v) - {"type", "content"}):
            raise ValueError("a prediction is {\"type\": \"content\", \"content\": ...}")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        _refuse(self, CHAT_REFUSED)
        for i, m in enumerate(self.messages):
            m.check(f"messages.{i}")
        if self.store:
            raise ApiError(400, "'store' is not supported: this server stores no completions",
                           param="store", code="unsupported_value")
        if self.service_tier not in (None, "auto", "default"):
            raise ApiError(400, f"'service_tier' {self.service_tier[:40]!r} is not supported: this "
                           "server has one tier ('auto' and 'default' are accepted)",
                           param="service_tier", code="unsupported_value")
        if self.modalities is not None and self.modalities != ["text"]:
            raise ApiError(400, "'modalities' other than [\"text\"] are not supported: this server "
                           "serves text models", param="modalities", code="unsupported_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs",
                           code="invalid_value")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise ApiError(400, f"tool_choice names the function "
                               f"'{self.tool_choice.function.name[:64]}', which is not in tools",
                               param="tool_choice", code="invalid_value")
        if self.tool_choice in ("required",) and not self.tools:
            raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice",
                           code="invalid_value")
        if self.forces_tool_call and self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "response_format cannot be combined with tool_choice 'required' or "
                           "a named function (both constrain the output)", param="response_format",
                           code="invalid_value")
        rf = self.response_format
        if rf is not None:
            if rf.type == "json_schema" and rf.json_schema is None:
                raise ApiError(400, "response_format of type json_schema needs 'json_schema'",
                               param="response_format", code="invalid_value")
            if rf.type != "json_schema" and rf.json_schema is not None:
                raise ApiError(400, "'json_schema' is only allowed with type json_schema",
                               param="response_format", code="invalid_value")
            if rf.type != "text" and self.structured_outputs is not None:
                raise ApiError(400, "send either response_format or structured_outputs, not both",
                               param="structured_outputs", code="invalid_value")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def uses_tools(self) -> bool:
        """Whether tools reach the template and the output is parsed for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_call(self) -> bool:
        return bool(self.tools) and (self.tool_choice == "required"
                                     or isinstance(self.tool_choice, NamedToolChoice))

    @property
    def num_prompts(self) -> int:
        return 1


# -- /v1/tokenize and /v1/detokenize (vLLM's shapes) -------------------------------------------

#: Token ids one detokenize request may send (the body limit bounds the text of a tokenize one).
MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    #: Default: true for a prompt, false for messages (the template places its own).
    add_special_tokens: StrictBool | None = None
    #: Messages only (default true); with a prompt it would change nothing, so it is refused.
    add_generation_prompt: StrictBool | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    chat_template: str | None = None

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send exactly one of 'prompt' and 'messages'", param="prompt",
                           code="invalid_value")
        if self.messages is not None and self.add_special_tokens:
            raise ApiError(400, "add_special_tokens applies to 'prompt' only (the chat template "
                           "places the special tokens of messages)", param="add_special_tokens",
                           code="invalid_value")
        if self.prompt is not None:
            for name in ("add_generation_prompt", "tools", "chat_template"):
                if getattr(self, name) is not None:
                    raise ApiError(400, f"{name} applies to 'messages' only", param=name,
                                   code="invalid_value")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)

    def check_supported(self) -> None:
        """Nothing to refuse beyond the model's fields."""
