"""A scripted engine for the server's tests, also built inside an engine process by name
(``EngineProcess(..., factory="fake_engine:make_engine")``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.config import EngineConfig
from sagellm.engine.stats import EngineStats
from sagellm.outputs import RequestMetrics, RequestOutput
from sagellm.sampling_params import SamplingParams

#: Prompt tokens with a meaning to the fake: refused by add_request, crash the next step, make
#: every step take ``SLOW_STEP_S``, make this request's every output carry ``BIG_TEXT_CHARS`` of
#: text (messages far larger than a pipe's buffer), make the next step never return, finish this
#: request with a per-request engine error (``RequestOutput.error``).
REFUSE, EXPLODE, SLOW, BIG, HANG, FAIL_ONE = 999, 666, 777, 888, 555, 444
SLOW_STEP_S = 0.02
#: Like SLOW, with ``CRAWL_STEP_S`` per step: streams that outlast a shutdown timeout.
CRAWL, CRAWL_STEP_S = 778, 0.1
BIG_TEXT_CHARS = 300_000
FAIL_ONE_MESSAGE = "the fake engine failed this request"


class FakeEngine:
    """Emits token ``len(prompt) + i`` per step, one KV block per request; may be told to crash.

    ``gate`` (when set) must be released for each step, so tests can hold requests in flight."""

    def __init__(self, gated: bool = False) -> None:
        self.reqs: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.explode = False
        self.gate = threading.Semaphore(0) if gated else None
        self.aborted: list[str] = []
        self.steps = 0
        self.slow = False
        self.crawl = False

    max_model_len = 64
    vocab_size = 1000

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str, *,
                    cache_salt: str | None = None) -> str:
        if REFUSE in prompt:
            raise ValueError(f"the fake engine refuses token {REFUSE}")
        if EXPLODE in prompt:
            self.explode = True
        if SLOW in prompt:
            self.slow = True
        if CRAWL in prompt:
            self.crawl = True
        self.reqs[request_id] = (list(prompt), params, [])
        return request_id

    def abort_request(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.reqs.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[RequestOutput]:
        if self.gate is not None:
            while not self.gate.acquire(timeout=0.05):
                if not self.reqs:
                    return []
        if self.explode:
            raise RuntimeError("simulated device failure")
        if self.slow:
            time.sleep(SLOW_STEP_S)
        if self.crawl:
            time.sleep(CRAWL_STEP_S)
        if any(HANG in prompt for prompt, _, _ in self.reqs.values()):
            while True:  # a step stuck for good (a wedged device); only SIGKILL ends it
                time.sleep(3600)
        self.steps += 1
        outs = []
        now = time.monotonic()
        for rid, (prompt, params, out) in list(self.reqs.items()):
            tok = len(prompt) + len(out)
            out.append(tok)
            failed = FAIL_ONE in prompt
            done = failed or len(out) >= params.max_tokens
            if done:
                del self.reqs[rid]
            text = f" {tok}" if len(out) > 1 else str(tok)
            if BIG in prompt:
                text = text.ljust(BIG_TEXT_CHARS, ".")
            o = RequestOutput.from_lists(
                rid, None, prompt, list(out), " ".join(map(str, out)), new_token_ids=[tok],
                new_text=text, finished=done,
                finish_reason=("error" if failed else "length") if done else None,
                metrics=RequestMetrics(now, now, now, now, now if done else None))
            if failed:
                o.error = FAIL_ONE_MESSAGE  # type: ignore[attr-defined]  # RequestOutput.error, newer cores
            outs.append(o)
        return outs

    def get_stats(self) -> EngineStats:
        n = len(self.reqs)
        return EngineStats(num_running=n, kv_usage=n / 10, num_kv_blocks=10, num_free_kv_blocks=10 - n,
                           num_steps=self.steps)


class FakeTokenizer:
    """One token per character (its code point); the chat template concatenates contents."""

    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Any:
        @dataclass
        class Enc:
            input_ids: list[Any]

        if isinstance(text, list):
            return Enc([[ord(c) for c in t] for t in text])
        return Enc([ord(c) for c in text])

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool,
                            chat_template: str | None) -> str:
        return "".join(m["content"] for m in messages)


def make_engine(config: EngineConfig) -> FakeEngine:
    return FakeEngine()


def make_broken_engine(config: EngineConfig) -> FakeEngine:
    raise ValueError("this fake engine cannot be built")
