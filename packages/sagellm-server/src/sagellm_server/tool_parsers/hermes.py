"""Hermes / Qwen2.5 style: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
anywhere in the output, between or after plain text."""

from __future__ import annotations

from sagellm_server.tool_parsers.base import ToolCallParser, partial_suffix

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolCallParser):
    name = "hermes"

    def find_start(self, final: bool) -> tuple[int, int] | None:
        i = self.text.find(START, self.pos)
        return None if i < 0 else (i, i + len(START))

    def hold_back(self) -> int:
        return partial_suffix(self.text, START)

    def after_call(self, end: int, final: bool) -> int | None:
        rest = self.text[end:]
        stripped = rest.lstrip()
        if stripped.startswith(END):
            return end + (len(rest) - len(stripped)) + len(END)
        if final or (stripped and not END.startswith(stripped[:len(END)])):
            return end  # no closing tag (the model stopped, or wrote on): the call stands
        return None
