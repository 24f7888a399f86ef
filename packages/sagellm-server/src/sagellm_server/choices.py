"""One choice of a response as it is built: its text or message, tool calls and logprobs, for
the final body (``final``) or one stream chunk at a time (``piece``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm.outputs import RequestOutput, TokenLogprob
from sagellm_server import logprobs_format
from sagellm_server.logprobs_format import CompletionLogprobs
from sagellm_server.token_table import TokenTable
from sagellm_server.tool_parsers import PARSERS, ParsedText, ToolCall, ToolCallParser


def _joined(outs: Sequence[RequestOutput]) -> tuple[str, list[int], list[TokenLogprob]]:
    text = "".join(o.new_text for o in outs)
    ids = [t for o in outs for t in o.new_token_ids]
    lps = [e for o in outs for e in (o.new_logprobs or ())]
    return text, ids, lps


class CompletionChoice:
    """``choices[index]`` of a completion: ``echo`` puts the prompt's text (and, with logprobs,
    its tokens) first; ``echo_only`` (max_tokens=0) drops the one token the engine sampled."""

    def __init__(self, index: int, prompt_ids: list[int], echo_text: str | None, table: TokenTable | None,
                 echo_only: bool, return_token_ids: bool) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.echo_text = echo_text
        self.echo_only = echo_only
        self.return_token_ids = return_token_ids
        self.logprobs = CompletionLogprobs(table) if table is not None else None
        self.plain = echo_text is None and table is None
        self.num_generated = 0
        self._echoed = False

    def _echo(self, prompt_logprobs: list[TokenLogprob | None] | None) -> tuple[str, dict[str, Any] | None]:
        self._echoed = True
        if self.echo_text is None:
            return "", None
        if self.logprobs is None:
            return self.echo_text, None
        if prompt_logprobs is None:
            self.logprobs.skip_text(self.echo_text)
            return self.echo_text, None
        return self.echo_text, self.logprobs.piece(self.prompt_ids, prompt_logprobs,
                                                  self.echo_text)

    def _body(self, text: str, ids: list[int], lps: list[TokenLogprob],
              prompt_logprobs: list[TokenLogprob | None] | None, finish_reason: str | None,
              stop_reason: Any) -> dict[str, Any]:
        if self.echo_only:
            text, ids, lps = "", [], []
        head, pieces = "", []
        if not self._echoed:
            head, echo_piece = self._echo(prompt_logprobs)
            if echo_piece is not None:
                pieces.append(echo_piece)
        self.num_generated += len(ids)
        lp = None
        if self.logprobs is not None:
            if ids:
                pieces.append(self.logprobs.piece(ids, lps, text))
            lp = logprobs_format.merge(pieces)
        choice: dict[str, Any] = {"index": self.index, "text": head + text, "logprobs": lp,
                                  "finish_reason": finish_reason}
        if stop_reason is not None or finish_reason is not None:
            choice["stop_reason"] = stop_reason
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice

    def piece(self, outs: Sequence[RequestOutput]) -> dict[str, Any] | None:
        text, ids, lps = _joined(outs)
        prompt_lps = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
        last = outs[-1]
        if self._echoed and self.echo_only and not last.finished:
            return None
        return self._body(text, ids, lps, prompt_lps, last.finish_reason, last.stop_reason)

    def final(self, out: RequestOutput, logprobs: list[TokenLogprob],
              prompt_logprobs: list[TokenLogprob | None] | None) -> dict[str, Any]:
        return self._body(out.text, list(out.token_ids), logprobs, prompt_logprobs,
                          out.finish_reason, out.stop_reason)


class ChatChoice:
    """``choices[index]`` of a chat completion; with a tool-call style, the output is parsed for
    calls (``single``: ``parallel_tool_calls=false``, only the first call is returned)."""

    def __init__(self, index: int, style: str | None, single: bool, table: TokenTable | None,
                 return_token_ids: bool) -> None:
        self.index = index
        self.parser: ToolCallParser | None = PARSERS[style]() if style is not None else None
        self.single = single
        self.table = table
        self.return_token_ids = return_token_ids
        self.plain = self.parser is None and table is None
        self.num_generated = 0

    def _finish_reason(self, reason: str | None, calls: list[ToolCall]) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def _logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if self.table is None:
            return None
        return {"content": logprobs_format.chat_content(self.table, lps), "refusal": None}

    def piece(self, outs: Sequence[RequestOutput]) -> dict[str, Any] | None:
        text, ids, lps = _joined(outs)
        last = outs[-1]
        self.num_generated += len(ids)
        delta: dict[str, Any] = {}
        if self.parser is None:
            if text:
                delta["content"] = text
        else:
            parsed = self.parser.feed(text)
            if last.finished:
                rest = self.parser.finish()
                parsed = ParsedText(parsed.content + rest.content, parsed.calls + rest.calls)
            if parsed.content:
                delta["content"] = parsed.content
            calls = [c for c in parsed.calls if not (self.single and c.index > 0)]
            if calls:
                delta["tool_calls"] = [_call_delta(c) for c in calls]
        reason = last.finish_reason
        if reason is not None and self.parser is not None:
            reason = self._finish_reason(reason, self.parser.calls)
        if not delta and not ids and reason is None:
            return None
        choice: dict[str, Any] = {"index": self.index, "delta": delta, "logprobs": self._logprobs(lps),
                                  "finish_reason": reason}
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice

    def final(self, out: RequestOutput, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        self.num_generated = len(out.token_ids)
        content: str | None = out.text
        calls: list[ToolCall] = []
        if self.parser is not None:
            content, calls = self.parser.parse(out.text)
            if self.single:
                calls = calls[:1]
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        choice: dict[str, Any] = {"index": self.index, "message": message,
                                  "logprobs": self._logprobs(logprobs),
                                  "finish_reason": self._finish_reason(out.finish_reason, calls),
                                  "stop_reason": out.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = out.token_ids
        return choice


def _call_delta(c: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"index": c.index}
    if c.id is not None:
        d["id"] = c.id
        d["type"] = "function"
    fn: dict[str, Any] = {}
    if c.name is not None:
        fn["name"] = c.name
    fn["arguments"] = c.arguments
    d["function"] = fn
    return d


def by_index(batch: Sequence[RequestOutput]) -> dict[int, list[RequestOutput]]:
    """A batch of outputs (several steps, maybe several choices) grouped by choice."""
    out: dict[int, list[RequestOutput]] = {}
    for o in batch:
        out.setdefault(o.index, []).append(o)
    return out
