"""The engine loop and the app against a scripted fake engine: fast, and able to die on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from sagellm.outputs import RequestMetrics, RequestOutput
from sagellm.sampling_params import SamplingParams
from sagellm_server.app import ServerConfig, create_app
from sagellm_server.async_engine import AsyncEngine
from sagellm_server.metrics import ServerMetrics


@dataclass
class _Stats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_preemptions: int
    num_steps: int


class FakeEngine:
    """Emits token ``len(prompt) + i`` per step, one KV block per request; may be told to crash.

    ``gate`` (when set) must be released for each step, so tests can hold requests in flight."""

    def __init__(self, gated: bool = False) -> None:
        self.reqs: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.explode = False
        self.gate = threading.Semaphore(0) if gated else None
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str) -> str:
        if 999 in prompt:
            raise ValueError("the fake engine refuses token 999")
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
        self.steps += 1
        outs = []
        now = time.monotonic()
        for rid, (prompt, params, out) in list(self.reqs.items()):
            tok = len(prompt) + len(out)
            out.append(tok)
            done = len(out) >= params.max_tokens
            if done:
                del self.reqs[rid]
            outs.append(RequestOutput.from_lists(
                rid, None, prompt, list(out), " ".join(map(str, out)), new_token_ids=[tok],
                new_text=f" {tok}" if len(out) > 1 else str(tok), finished=done,
                finish_reason="length" if done else None,
                metrics=RequestMetrics(now, now, now, now, now if done else None)))
        return outs

    def get_stats(self) -> _Stats:
        n = len(self.reqs)
        return _Stats(n, 0, n / 10, 10, 10 - n, 0, 0, 0, self.steps)


class _Tok:
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __call__(self, text: str | list[str], add_special_tokens: bool = True):  # type: ignore[no-untyped-def]
        @dataclass
        class Enc:
            input_ids: list

        if isinstance(text, list):
            return Enc([[ord(c) for c in t] for t in text])
        return Enc([ord(c) for c in text])

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template):  # type: ignore[no-untyped-def]
        return "".join(m["content"] for m in messages)


def make_client(engine: FakeEngine, **kw: int) -> TestClient:
    metrics = ServerMetrics("fake")
    aeng = AsyncEngine(engine, max_num_seqs=kw.get("max_num_seqs", 4),
                       max_queued_requests=kw.get("max_queued_requests", 4), metrics=metrics)
    cfg = ServerConfig(served_model_name="fake", max_model_len=64, vocab_size=1000, log_interval=0)
    return TestClient(create_app(aeng, cfg, _Tok(), metrics))


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(fake: FakeEngine) -> Iterator[TestClient]:
    with make_client(fake) as c:
        yield c


def test_completion_through_the_loop(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == [3, 4, 5]
    assert body["choices"][0]["text"] == "3 4 5"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_streaming_merges_and_orders(client: TestClient) -> None:
    body = {"prompt": ["ab", "abcd"], "max_tokens": 2, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    by_index: dict[int, list[int]] = {0: [], 1: []}
    for c in chunks[:-1]:
        by_index[c["choices"][0]["index"]] += c["choices"][0]["token_ids"]
    assert by_index == {0: [2, 3], 1: [4, 5]}
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


def test_engine_rejecting_a_request_fails_only_that_request(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [999], "max_tokens": 2})
    assert r.status_code == 400 and "999" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200


def test_queue_full_is_503_and_admits_again_later() -> None:
    fake = FakeEngine(gated=True)
    with make_client(fake, max_num_seqs=1, max_queued_requests=1) as c:
        body = {"prompt": "x", "max_tokens": 2, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as a, \
                c.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == b.status_code == 200
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            for _ in range(4):
                fake.gate.release()  # type: ignore[union-attr]
            assert [ln for ln in a.iter_lines() if ln][-1] == "data: [DONE]"
            assert [ln for ln in b.iter_lines() if ln][-1] == "data: [DONE]"
        fake.gate.release()  # type: ignore[union-attr]
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1, "stream": True}) as r2:
            fake.gate.release()  # type: ignore[union-attr]
            assert r2.status_code == 200 and [ln for ln in r2.iter_lines() if ln][-1] == "data: [DONE]"


def test_engine_death_turns_health_503(fake: FakeEngine, client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    fake.explode = True
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
    h = client.get("/health")
    assert h.status_code == 503 and "simulated device failure" in h.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert 'sagellm:engine_alive{model_name="fake"} 0.0' in client.get("/metrics").text


def test_chat_uses_template(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}],
                                                  "max_tokens": 2, "return_token_ids": True})
    assert r.status_code == 200
    assert r.json()["choices"][0]["token_ids"] == [3, 4]
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "3 4"}
    # Chat's default max_tokens is the rest of the context (64 - 3).
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}]})
    assert r.json()["usage"]["completion_tokens"] == 61


def test_chunked_body_over_limit_is_413(fake: FakeEngine) -> None:
    metrics = ServerMetrics("fake")
    aeng = AsyncEngine(fake, max_num_seqs=4, metrics=metrics)
    cfg = ServerConfig(served_model_name="fake", max_model_len=64, vocab_size=1000, log_interval=0,
                       max_request_body_bytes=100)
    with TestClient(create_app(aeng, cfg, _Tok(), metrics)) as c:
        def gen() -> Iterator[bytes]:
            yield b'{"prompt": "'
            yield b"x" * 200
            yield b'"}'

        r = c.post("/v1/completions", content=gen(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        ok = c.post("/v1/completions", content=iter([b'{"prompt": "ab", ', b'"max_tokens": 1}']))
        assert ok.status_code == 200, ok.text
