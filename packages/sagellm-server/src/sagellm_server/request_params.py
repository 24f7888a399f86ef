"""A validated OpenAI request as the engine's :class:`SamplingParams`: sampling, penalties,
logprobs, ``n`` and structured output (``response_format``, the ``structured_outputs``
extension, and the grammar that forces a tool call)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sagellm.sampling_params import SamplingParams
from sagellm.structured import StructuredOutputParams, auto_tool_call_grammar, tool_call_grammar
from sagellm_server.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    validation_error,
)

Request = CompletionRequest | ChatCompletionRequest

#: Request fields copied as they are when set (else the engine's defaults apply).
_PASSED = ("temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "presence_penalty",
           "frequency_penalty", "repetition_penalty")


def structured_output(req: Request, tool_style: str | None, tokenizer: object | None = None
                      ) -> tuple[StructuredOutputParams | None, str]:
    """What constrains the output, and the request field to name when it is refused.

    ``tokenizer`` lets a forced tool call emit its tags (Hermes' ``<tool_call>``) as the single
    tokens they are in the model's vocabulary."""
    if isinstance(req, ChatCompletionRequest) and req.forces_tool_call:
        assert tool_style is not None
        choice: str | dict[str, Any] = (
            {"type": "function", "function": {"name": req.tool_choice.function.name}}
            if isinstance(req.tool_choice, NamedToolChoice) else "required")
        tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
        try:
            # OpenAI's default allows several calls; ``parallel_tool_calls: false`` exactly one.
            return tool_call_grammar(tools, choice, tool_style,
                                     parallel=req.parallel_tool_calls is not False,
                                     tokenizer=tokenizer), "tool_choice"
        except ValueError as exc:
            raise ApiError(400, f"invalid tool_choice: {exc}", param="tool_choice",
                           code="invalid_value") from None
    rf = req.response_format if isinstance(req, ChatCompletionRequest) else None
    if rf is not None and rf.type == "json_object":
        return StructuredOutputParams(json_object=True), "response_format"
    if rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        assert js is not None  # check_supported
        if js.schema_ is None:
            return StructuredOutputParams(json_object=True), "response_format"
        return _structured("response_format", json_schema=js.schema_, strict=bool(js.strict)), "response_format"
    so = req.structured_outputs
    if so is None:
        auto = _strict_auto_tools(req, tool_style, tokenizer)
        return auto, "tools" if auto is not None else ""
    given = {k: v for k, v in (("json_schema", so.json_), ("json_object", so.json_object or None),
                               ("regex", so.regex), ("grammar", so.grammar), ("choice", so.choice))
             if v is not None}
    if len(given) != 1:
        raise ApiError(400, "structured_outputs takes exactly one of json, json_object, regex, "
                       f"grammar, choice (got {len(given)})", param="structured_outputs",
                       code="invalid_value")
    return _structured("structured_outputs", **given), "structured_outputs"


def _strict_auto_tools(req: Request, tool_style: str | None, tokenizer: object | None
                       ) -> StructuredOutputParams | None:
    """Under ``tool_choice`` ``"auto"`` (or none given), when any tool is ``strict``: prose or
    calls whose arguments follow the tools' schemas (``auto_tool_call_grammar``); ``None``
    without strict tools, and where the style cannot be enforced under auto (a Hermes model
    whose ``<tool_call>`` is not one token: its calls are then parsed unconstrained)."""
    if not isinstance(req, ChatCompletionRequest) or tool_style is None or not req.tools:
        return None
    if req.tool_choice not in (None, "auto"):
        return None
    if not any(t.function.strict for t in req.tools):
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        return auto_tool_call_grammar(tools, tool_style,  # type: ignore[arg-type]
                                      parallel=req.parallel_tool_calls is not False,
                                      tokenizer=tokenizer)
    except ValueError as exc:
        raise ApiError(400, f"invalid tools: {exc}", param="tools",
                       code="invalid_value") from None


def _structured(param: str, **fields: Any) -> StructuredOutputParams:
    """The constraint, or a 400 naming ``param`` where it breaks one of ``StructuredOutputParams``'
    own bounds (an empty regex, grammar or choice, a schema or grammar over its size limit)."""
    try:
        return StructuredOutputParams(**fields)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0].get("msg", "invalid value")
        raise ApiError(400, f"invalid {param}: {msg}", param=param, code="invalid_value") from None


def sampling_params(req: Request, *, max_tokens: int, vocab_size: int, logprobs: int | None,
                    prompt_logprobs: int | None, structured: StructuredOutputParams | None) -> SamplingParams:
    """The engine's parameters for one prompt of ``req`` (a 400 naming the field if refused)."""
    for t in req.stop_token_ids or ():
        if not 0 <= t < vocab_size:
            raise ApiError(400, f"stop token id {t} is outside the vocabulary (0..{vocab_size - 1})",
                           param="stop_token_ids", code="invalid_value")
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "min_tokens": req.min_tokens,
                              "ignore_eos": req.ignore_eos, "seed": req.seed, "n": req.n,
                              "include_stop_str_in_output": req.include_stop_str_in_output,
                              "skip_special_tokens": req.skip_special_tokens}
    optional = {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
                "logit_bias": req.logit_bias_ids(vocab_size), "structured_output": structured,
                **{name: getattr(req, name) for name in _PASSED}}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    try:
        return SamplingParams(**kwargs)
    except ValidationError as exc:
        raise validation_error(exc) from None
