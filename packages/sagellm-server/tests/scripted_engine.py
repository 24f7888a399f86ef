"""An engine that replies with scripted text, one character (= token, with ``CharTokenizer``)
per step, for every choice of ``n``, with synthetic logprobs: what the OpenAI-fidelity tests
need to see the server's formats without a model. It records what it was asked."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.engine.stats import EngineStats
from sagellm.outputs import RequestMetrics, RequestOutput, TokenLogprob
from sagellm.sampling_params import SamplingParams

REPLY_MARKER = "REPLY:"
DEFAULT_REPLY = "hello world"


def reply_of(prompt: Sequence[int]) -> str:
    """The text after the last ``REPLY:`` in the prompt (up to a ``|``, the template's message
    end), else ``DEFAULT_REPLY``."""
    text = "".join(map(chr, prompt))
    i = text.rfind(REPLY_MARKER)
    return text[i + len(REPLY_MARKER):].split("|")[0] if i >= 0 else DEFAULT_REPLY


def logprob_of(token_id: int, k: int) -> TokenLogprob:
    """A made-up distribution: the token at -0.5, its ``k`` alternatives at -1, -2, ..."""
    top = tuple((token_id + 1 + j, -1.0 - j) for j in range(k))
    return TokenLogprob(token_id, -0.5, 1, top)


class ScriptedEngine:
    max_model_len = 4096
    vocab_size = 1000

    def __init__(self) -> None:
        self.reqs: dict[str, list[Any]] = {}
        self.added: list[tuple[str, list[int], SamplingParams, str | None]] = []

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str, *,
                    cache_salt: str | None = None) -> str:
        self.added.append((request_id, list(prompt), params, cache_salt))
        self.reqs[request_id] = [list(prompt), params, {j: [] for j in range(params.n)}, True]
        return request_id

    def abort_request(self, request_id: str) -> bool:
        return self.reqs.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[RequestOutput]:
        outs = []
        now = time.monotonic()
        for rid, state in list(self.reqs.items()):
            prompt, params, gen, first = state
            state[3] = False
            reply = reply_of(prompt)
            for j, toks in list(gen.items()):
                tok = ord(reply[len(toks)]) if len(toks) < len(reply) else ord(".")
                toks.append(tok)
                stop = len(toks) >= len(reply)
                done = stop or len(toks) >= params.max_tokens
                if done:
                    del gen[j]
                o = RequestOutput.from_lists(
                    rid, None, prompt, list(toks), "".join(map(chr, toks)), new_token_ids=[tok],
                    new_text=chr(tok), finished=done,
                    finish_reason=("stop" if stop else "length") if done else None,
                    metrics=RequestMetrics(now, now, now, now, now if done else None))
                o.index = j  # type: ignore[attr-defined]
                if params.logprobs is not None:
                    o.new_logprobs = [logprob_of(tok, params.logprobs)]  # type: ignore[attr-defined]
                if params.prompt_logprobs is not None and first:
                    o.prompt_logprobs = [None] + [logprob_of(t, params.prompt_logprobs)  # type: ignore[attr-defined]
                                                  for t in prompt[1:]]
                outs.append(o)
            if not gen:
                del self.reqs[rid]
        return outs

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.reqs), num_kv_blocks=10, num_free_kv_blocks=10)


@dataclass
class _Enc:
    input_ids: list[Any]


class CharTokenizer:
    """One token per character; the template shows tools and tool calls as text, and names the
    Hermes ``<tool_call>`` format, so the server picks that parser."""

    chat_template = (
        "{% if tools %}[tools:{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
        "{% for m in messages %}{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}"
        "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}|{% endfor %}")

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> _Enc:
        if isinstance(text, list):
            return _Enc([[ord(c) for c in t] for t in text])
        return _Enc([ord(c) for c in text])

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))
