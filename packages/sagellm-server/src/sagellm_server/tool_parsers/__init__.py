"""Tool-call parsers, one per output style, and how the server picks one for a model."""

from __future__ import annotations

from sagellm_server.tool_parsers.base import ParsedText, ToolCall, ToolCallDelta, ToolCallParser
from sagellm_server.tool_parsers.hermes import HermesToolParser
from sagellm_server.tool_parsers.llama3_json import Llama3JsonToolParser

PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}

__all__ = ["PARSERS", "ParsedText", "ToolCall", "ToolCallDelta", "ToolCallParser", "detect_style"]


def detect_style(chat_template: str) -> str | None:
    """The style a chat template asks its model to call tools in, or None if it shows none."""
    if "<tool_call>" in chat_template:
        return HermesToolParser.name
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return Llama3JsonToolParser.name
    return None
