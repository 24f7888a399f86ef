"""The engine loop and the app against a scripted fake engine: fast, and able to die on demand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_engine import FAIL_ONE, FAIL_ONE_MESSAGE, FakeEngine, FakeTokenizer
from fastapi.testclient import TestClient

from sagellm_server.app import ServerConfig, create_app
from sagellm_server.async_engine import AsyncEngine
from sagellm_server.metrics import ServerMetrics
from sagellm_server.supervisor import EXIT_ENGINE_DEAD, EngineSupervisor, ExitRequest, SupervisionPolicy


def make_client(engine: FakeEngine, **kw: int) -> TestClient:
    metrics = ServerMetrics("fake")
    aeng = AsyncEngine(engine, max_num_seqs=kw.get("max_num_seqs", 4),
                       max_queued_requests=kw.get("max_queued_requests", 4), metrics=metrics)
    cfg = ServerConfig(served_model_name="fake", max_model_len=64, vocab_size=1000, log_interval=0)
    return TestClient(create_app(aeng, cfg, FakeTokenizer(), metrics))


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
    assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
    assert "simulated" not in h.text  # public: down, not why
    assert client.head("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    m = client.get("/metrics").text
    assert 'sagellm:engine_alive{model_name="fake"} 0.0' in m
    assert "sagellm:num_requests_running{" not in m


def test_health_answers_head(client: TestClient) -> None:
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""


def test_engine_failing_one_request_fails_only_that_one(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [3, FAIL_ONE], "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert FAIL_ONE_MESSAGE in r.json()["error"]["message"]
    body = {"prompt": [FAIL_ONE], "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    assert FAIL_ONE_MESSAGE in json.loads(lines[-2][6:])["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200
    assert client.get("/health").status_code == 200


def test_in_process_engine_death_asks_the_server_to_exit(fake: FakeEngine) -> None:
    """An engine thread cannot be restarted: with a supervisor, its death means exit status 1."""
    metrics = ServerMetrics("fake")
    aeng = AsyncEngine(fake, max_num_seqs=4, metrics=metrics)
    exit_request = ExitRequest()
    sup = EngineSupervisor(aeng, SupervisionPolicy(), exit_request, metrics)
    cfg = ServerConfig(served_model_name="fake", max_model_len=64, vocab_size=1000, log_interval=0)
    with TestClient(create_app(aeng, cfg, FakeTokenizer(), metrics, sup)) as c:
        assert c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200
        assert not exit_request.requested
        fake.explode = True
        assert c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 500
        c.get("/health")  # one more trip through the event loop, where the supervisor runs
        assert exit_request.code == EXIT_ENGINE_DEAD


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
    with TestClient(create_app(aeng, cfg, FakeTokenizer(), metrics)) as c:
        def gen() -> Iterator[bytes]:
            yield b'{"prompt": "'
            yield b"x" * 200
            yield b'"}'

        r = c.post("/v1/completions", content=gen(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        ok = c.post("/v1/completions", content=iter([b'{"prompt": "ab", ', b'"max_tokens": 1}']))
        assert ok.status_code == 200, ok.text
