"""Llama 3.x JSON style: the whole answer is one or more ``{"name": ..., "parameters": {...}}``
objects (``;``-separated), optionally after the ``<|python_tag|>`` token. An answer that starts
with anything else is plain content, and so is an object that is not a call."""

from __future__ import annotations

from sagellm_server.tool_parsers.base import ToolCallParser, partial_suffix

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolCallParser):
    name = "llama3_json"

    def __init__(self) -> None:
        super().__init__()
        self.open = True  # still where a call may start: the beginning, or after a call

    def find_start(self, final: bool) -> tuple[int, int] | None:
        if not self.open:
            return None
        rest = self.text[self.pos:]
        stripped = rest.lstrip()
        if stripped.startswith(PYTHON_TAG):
            stripped = stripped[len(PYTHON_TAG):].lstrip()
        if stripped.startswith("{"):
            return self.pos, len(self.text) - len(stripped)
        if stripped and not PYTHON_TAG.startswith(stripped):
            self.open = False  # prose: no calls in this answer
        return None

    def hold_back(self) -> int:
        if not self.open:
            return 0
        rest = self.text[self.pos:]
        if not rest.strip() or PYTHON_TAG.startswith(rest.lstrip()):
            return len(rest)  # undecided: blank so far, or a partial tag
        return partial_suffix(self.text, PYTHON_TAG)

    def after_call(self, end: int, final: bool) -> int | None:
        rest = self.text[end:]
        stripped = rest.lstrip()
        if stripped.startswith(";"):
            return end + (len(rest) - len(stripped)) + 1
        if stripped.startswith("{"):
            return end + (len(rest) - len(stripped))
        if final or stripped:
            self.open = bool(final and not stripped)
            return end
        return None

    def on_not_a_call(self) -> None:
        self.open = False
