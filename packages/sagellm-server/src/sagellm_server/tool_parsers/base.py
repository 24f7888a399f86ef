"""Tool calls in a model's output, found as the text streams in.

A parser is made per choice and fed the text as it is generated; each ``feed`` returns what can
be said now: plain content, and tool-call deltas (first the call's ``id`` and function name,
then fragments of its JSON arguments, in OpenAI's streaming shape). Text that might still turn
out to be part of a call (a half-arrived ``<tool_call>``) is held back until it is decided. The
non-streaming answer is the same parser fed the whole text at once, so the two always agree.

A call is a JSON object whose first key is ``"name"``, then ``"arguments"`` (or Llama's
``"parameters"``): the arguments stream as the model writes them, byte for byte, ending where
their object closes. An object that turns out not to be a call (no name, not JSON) is given back
as content, provided nothing of it was sent as a call yet.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class ToolCallDelta:
    """A piece of one call: ``id`` and ``name`` come once, in its first delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedText:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class _Call:
    """A call being read: ``start`` is where its JSON object begins in the text."""

    index: int
    start: int
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str | None = None
    name_sent: bool = False
    args_start: int | None = None
    args_end: int | None = None
    args_sent: int = 0  # characters of the raw arguments sent
    # The scan of the object: position reached, brace depth, inside a string, after a backslash.
    scan: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    end: int | None = None  # one past the object's closing brace


class ToolCallParser(ABC):
    """One choice's parser; subclasses say where calls start and what may follow one."""

    #: The ``--tool-call-parser`` name of this style (also the style passed to the grammar).
    name: ClassVar[str]

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # everything before it has been given out (as content or as a call)
        self.call: _Call | None = None
        self.calls: list[ToolCall] = []
        self._num_calls = 0

    # -- what a style decides --------------------------------------------------------------

    @abstractmethod
    def find_start(self, final: bool) -> tuple[int, int] | None:
        """Where the next call's marker begins and where its JSON begins, at or after ``pos``;
        None if there is none. Without ``final``, may also answer by holding back (see
        :meth:`hold_back`)."""

    @abstractmethod
    def hold_back(self) -> int:
        """How many characters at the end of the text to keep back: they may begin a marker."""

    @abstractmethod
    def after_call(self, end: int, final: bool) -> int | None:
        """Where content resumes after a call's object ending at ``end``; None: not known yet."""

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, delta: str) -> ParsedText:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> ParsedText:
        """Everything still held back, now that the text is complete."""
        out = self._advance(final=True)
        call = self.call
        if call is not None:  # an unfinished call (the output was cut short)
            if call.name_sent:  # announced: it stands, with the arguments written so far
                assert call.args_start is not None
                raw = self.text[call.args_start:]
                self._send_args(out, call, raw)
                self._close(call, raw)
            else:
                out.content += self.text[self.pos:]
                self.call = None
            self.pos = len(self.text)
        return out

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole text at once: its content (None if empty) and its calls."""
        a, b = self.feed(text), self.finish()
        content = a.content + b.content
        return (content if content.strip() or not self.calls else None), self.calls

    def _advance(self, final: bool) -> ParsedText:
        out = ParsedText()
        while True:
            if self.call is None:
                found = self.find_start(final)
                if found is None:
                    end = len(self.text) if final else max(self.pos, len(self.text) - self.hold_back())
                    out.content += self.text[self.pos:end]
                    self.pos = end
                    return out
                marker, start = found
                out.content += self.text[self.pos:marker]
                self.pos = marker
                self.call = _Call(self._num_calls, start, scan=start)
            if not self._read_call(out, final):
                return out

    def _read_call(self, out: ParsedText, final: bool) -> bool:
        """Progress on the current call; True once it is done (the loop looks for the next)."""
        call, text = self.call, self.text
        assert call is not None
        if call.name is None:
            m = _NAME.match(text, call.start)
            if m:
                try:
                    call.name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    call.name = None
        if call.name is not None and call.args_start is None:
            m = _NAME.match(text, call.start)
            assert m is not None
            a = _ARGS.match(text, m.end())
            if a and a.end() < len(text):
                call.args_start = a.end()
        self._scan(call)
        if call.end is None:
            if call.name is not None and call.args_start is not None and text[call.args_start] == "{":
                self._send_name(out, call)
                upto = call.args_end if call.args_end is not None else call.scan
                self._send_args(out, call, text[call.args_start:upto])
            if self._not_json(call):
                self._give_back_as_content(out, call)
                return True
            return False
        resume = self.after_call(call.end, final)
        if resume is None:
            return False
        try:
            obj = json.loads(text[call.start:call.end])
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            if call.name_sent:  # already announced: close it as it stands
                self._close(call, "{}")
                self.pos = resume
                return True
            self._give_back_as_content(out, call, resume)
            return True
        args = obj.get("arguments", obj.get("parameters", {}))
        if call.args_start is not None and call.args_end is not None and isinstance(args, dict):
            raw = text[call.args_start:call.args_end]
        else:
            raw = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call.name = obj["name"]
        self._send_name(out, call)
        self._send_args(out, call, raw)
        self._close(call, raw)
        self.pos = resume
        return True

    def _scan(self, call: _Call) -> None:
        """Move the brace scan forward over the new text (strings and escapes respected)."""
        text, i = self.text, call.scan
        depth, in_string, escaped = call.depth, call.in_string, call.escaped
        while i < len(text) and call.end is None:
            c = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 1 and call.args_start is not None and call.args_end is None and i >= call.args_start:
                    call.args_end = i + 1
                if depth == 0:
                    call.end = i + 1
            i += 1
        call.scan, call.depth, call.in_string, call.escaped = i, depth, in_string, escaped

    def _not_json(self, call: _Call) -> bool:
        """Whether the text after the marker already cannot be a JSON object."""
        rest = self.text[call.start:call.start + 64].lstrip()
        return bool(rest) and rest[0] != "{" and not call.name_sent

    def _send_name(self, out: ParsedText, call: _Call) -> None:
        if not call.name_sent:
            call.name_sent = True
            out.calls.append(ToolCallDelta(call.index, id=call.id, name=call.name))

    def _send_args(self, out: ParsedText, call: _Call, raw: str) -> None:
        more = raw[call.args_sent:]
        if more:
            call.args_sent = len(raw)
            if out.calls and out.calls[-1].index == call.index:
                out.calls[-1].arguments += more
            else:
                out.calls.append(ToolCallDelta(call.index, arguments=more))

    def _close(self, call: _Call, raw: str) -> None:
        assert call.name is not None
        self.calls.append(ToolCall(call.id, call.name, raw))
        self._num_calls += 1
        self.call = None

    def _give_back_as_content(self, out: ParsedText, call: _Call, resume: int | None = None) -> None:
        end = len(self.text) if resume is None else resume
        out.content += self.text[self.pos:end]
        self.pos = end
        self.call = None
        self.on_not_a_call()

    def on_not_a_call(self) -> None:
        """A marker turned out not to start a call (a style may stop looking for more)."""


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a beginning of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
