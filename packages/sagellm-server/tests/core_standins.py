"""The smallest stand-ins for core names that other branches add (sampling: SamplingParams'
new fields, RequestOutput.index/new_logprobs/prompt_logprobs, TokenLogprob; structured:
``sagellm.structured``), installed only where the core lacks them, so the server's in-process
tests run before those branches are merged. Once they are, nothing here is installed.
Nothing here samples or constrains anything: the scripted engine only echoes the parameters."""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import sagellm
import sagellm.outputs
import sagellm.sampling_params

INSTALLED: list[str] = []

if "n" not in sagellm.sampling_params.SamplingParams.model_fields:
    class _SamplingParams(sagellm.sampling_params.SamplingParams):
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        repetition_penalty: float = 1.0
        logit_bias: dict[int, float] | None = None
        min_p: float = 0.0
        n: int = Field(1, ge=1)
        logprobs: int | None = Field(None, ge=0, le=20)
        prompt_logprobs: int | None = Field(None, ge=0, le=20)
        structured_output: Any = None

    sagellm.sampling_params.SamplingParams = _SamplingParams  # type: ignore[misc]
    sagellm.SamplingParams = _SamplingParams  # type: ignore[misc]
    INSTALLED.append("SamplingParams fields")

if not hasattr(sagellm.outputs, "TokenLogprob"):
    @dataclass(frozen=True)
    class TokenLogprob:
        token_id: int
        logprob: float
        rank: int
        top: tuple[tuple[int, float], ...]

    sagellm.outputs.TokenLogprob = TokenLogprob  # type: ignore[attr-defined]
    INSTALLED.append("TokenLogprob")

if not hasattr(sagellm.outputs.RequestOutput, "index"):
    sagellm.outputs.RequestOutput.index = 0  # type: ignore[attr-defined]
    sagellm.outputs.RequestOutput.new_logprobs = None  # type: ignore[attr-defined]
    sagellm.outputs.RequestOutput.prompt_logprobs = None  # type: ignore[attr-defined]
    INSTALLED.append("RequestOutput fields")

try:
    import sagellm.structured  # noqa: F401
    REAL_STRUCTURED = True
except ImportError:
    REAL_STRUCTURED = False

    class StructuredOutputParams(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        json_schema: dict[str, Any] | None = None
        json_object: bool = False
        regex: str | None = None
        grammar: str | None = None
        choice: list[str] | None = None
        strict: bool = False

    def validate(params: StructuredOutputParams) -> None:
        if params.regex is not None:
            try:
                re.compile(params.regex)
            except re.error as exc:
                raise ValueError(f"the regex does not compile: {exc}") from None
        t = (params.json_schema or {}).get("type")
        if t is not None and not isinstance(t, (str, list)):
            raise ValueError("the schema's 'type' must be a string or a list")

    def tool_call_grammar(tools: list[dict[str, Any]], choice: str, style: str) -> StructuredOutputParams:
        return StructuredOutputParams(grammar=f"{style}:{choice}:{len(tools)}")

    mod = types.ModuleType("sagellm.structured")
    mod.StructuredOutputParams = StructuredOutputParams  # type: ignore[attr-defined]
    mod.validate = validate  # type: ignore[attr-defined]
    mod.tool_call_grammar = tool_call_grammar  # type: ignore[attr-defined]
    sys.modules["sagellm.structured"] = mod
    sagellm.structured = mod  # type: ignore[attr-defined]
    INSTALLED.append("sagellm.structured")
