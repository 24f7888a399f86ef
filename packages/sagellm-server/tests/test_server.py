"""End to end: a real server process, the ``openai`` package (and raw httpx) as clients."""

from __future__ import annotations

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from server_harness import (
    API_KEY,
    MODEL_NAME,
    Server,
    descendants,
    engine_pid,
    is_running,
    serving_backend,
)

from sagellm import SamplingParams

PROMPTS = [f"Question {i}: what is {i} plus {3 * i}? Answer:" for i in range(32)]
MAX_TOKENS = 8


def client(server: Server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def metrics(server: Server) -> dict[str, float]:
    """Every sample of /metrics as ``name{label=value,...}`` (labels other than model_name)."""
    r = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10)
    assert r.status_code == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """Wait until no request runs or waits and every KV block is free again."""
    deadline = time.monotonic() + timeout
    m = metrics(server)
    while time.monotonic() < deadline:
        m = metrics(server)
        if (m["sagellm:num_requests_running"] == 0 and m["sagellm:num_requests_waiting"] == 0
                and m["sagellm:kv_cache_usage_perc"] == 0
                and m["sagellm:num_free_kv_blocks"] == m["sagellm:num_kv_blocks"]):
            return m
        time.sleep(0.2)
    raise AssertionError(f"the server did not go idle: {m}")


@pytest.fixture(scope="module")
def offline_greedy() -> list[list[int]]:
    """Reference outputs of the offline engine, in this process (same model, greedy)."""
    from sagellm import LLM

    backend = serving_backend()
    # Beside a GPU server that holds most of the device: a small fixed KV pool.
    llm = LLM(backend=backend, **({} if backend == "cpu" else {"num_kv_blocks": 512}))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # Generate from a worker thread, as the server's engine loop does: on a busy machine torch's
    # OpenMP pool in the main thread can be many times slower.
    with ThreadPoolExecutor(1) as pool:
        outs = pool.submit(llm.generate, PROMPTS, params, use_tqdm=False).result()
    ids = [o.token_ids for o in outs]
    del llm
    return ids


# -- the happy paths --------------------------------------------------------------------------


def test_engine_runs_in_its_own_process(server: Server) -> None:
    pid = engine_pid(server)
    assert pid != server.proc.pid and pid in descendants(server.proc.pid) and is_running(pid)


def test_completion_non_streaming_usage(server: Server) -> None:
    c = client(server)
    r = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                             temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.object == "text_completion" and r.model == MODEL_NAME
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.text
    ids = ch.model_extra["token_ids"]  # type: ignore[index]
    assert len(ids) == 5
    assert r.usage is not None
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == 5  # "The capital of France is" in SmolLM2's tokenizer
    assert r.usage.total_tokens == 10


def test_completion_prompt_forms(server: Server) -> None:
    c = client(server)
    tokens = [504, 3575, 282, 4649, 314]
    one = c.completions.create(model=MODEL_NAME, prompt=tokens, max_tokens=3, temperature=0)
    text = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3,
                                temperature=0)
    assert one.usage.prompt_tokens == 5  # type: ignore[union-attr]
    many = c.completions.create(model=MODEL_NAME, prompt=["Hello", "The capital of France is"],
                                max_tokens=3, temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1]
    assert many.choices[1].text == text.choices[0].text
    assert many.usage.completion_tokens == 6  # type: ignore[union-attr]
    ids = c.completions.create(model=MODEL_NAME, prompt=[tokens, tokens[:3]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 8  # type: ignore[union-attr]


def test_completion_streaming_include_usage(server: Server) -> None:
    c = client(server)
    full = c.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    text_chunks = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].text for ch in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 6)  # type: ignore[union-attr]
    assert usage.total_tokens == usage.prompt_tokens + 6


def test_stream_ends_with_done(server: Server) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # no include_usage asked


def test_chat_non_streaming_and_streaming(server: Server) -> None:
    c = client(server)
    messages: Any = [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage is not None and r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_stop_and_seed(server: Server) -> None:
    c = client(server)
    messages: Any = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    a = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0.9,
                                  seed=7, top_p=0.9, extra_body={"top_k": 20})
    b = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0.9,
                                  seed=7, top_p=0.9, extra_body={"top_k": 20})
    assert a.choices[0].message.content == b.choices[0].message.content
    full = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    content = full.choices[0].message.content or ""
    assert len(content) > 2
    stop = content[2]
    cut = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == content[: content.index(stop)]


def test_32_concurrent_streams_match_offline_greedy(server: Server, offline_greedy: list[list[int]]) -> None:
    async def one(c: openai.AsyncOpenAI, prompt: str) -> tuple[list[int], str]:
        ids: list[int] = []
        text = ""
        stream = await c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        async for ch in stream:
            ids.extend(ch.choices[0].model_extra["token_ids"])  # type: ignore[index]
            text += ch.choices[0].text
        return ids, text

    async def run() -> list[tuple[list[int], str]]:
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
        try:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS))
        finally:
            await c.close()

    before = metrics(server)
    results = asyncio.run(run())
    assert [ids for ids, _ in results] == offline_greedy
    assert all(len(ids) == MAX_TOKENS and text for ids, text in results)
    after = wait_idle(server)
    assert after["sagellm:generation_tokens_total"] - before["sagellm:generation_tokens_total"] == 32 * MAX_TOKENS
    # They were batched together, not served one after another.
    steps = after["sagellm:engine_steps_total"] - before["sagellm:engine_steps_total"]
    assert steps < 32 * MAX_TOKENS / 4


# -- disconnects and capacity -----------------------------------------------------------------


def test_disconnect_mid_stream_frees_kv_blocks(server: Server) -> None:
    wait_idle(server)
    before = metrics(server)
    c = client(server)
    stream = c.completions.create(model=MODEL_NAME, prompt="Tell me a very long story. " * 20,
                                  max_tokens=4000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    m = metrics(server)
    assert m["sagellm:kv_cache_usage_perc"] > 0 and m["sagellm:num_requests_running"] == 1
    stream.close()  # the client goes away mid-stream
    after = wait_idle(server, timeout=20)
    aborted = 'sagellm:request_success_total{finished_reason=abort}'
    assert after[aborted] == before[aborted] + 1
    assert after["sagellm:generation_tokens_total"] - before["sagellm:generation_tokens_total"] < 200


def test_disconnect_non_streaming_aborts(server: Server) -> None:
    wait_idle(server)
    body = {"model": MODEL_NAME, "prompt": "Write an essay.", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=1.5)
    wait_idle(server, timeout=20)


def test_full_queue_gives_503_and_others_continue(server: Server) -> None:
    """Capacity is 32 running + 4 queued; the 37th concurrent request is refused."""
    wait_idle(server)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as h:
            body = {"model": MODEL_NAME, "prompt": "Go on forever:", "max_tokens": 3000,
                    "ignore_eos": True, "stream": True}
            ctxs = [h.stream("POST", "/v1/completions", json=body) for _ in range(36)]
            responses = await asyncio.gather(*(cm.__aenter__() for cm in ctxs))
            try:
                assert all(r.status_code == 200 for r in responses)
                r = await h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1})
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "queue_full" and set(err) == {"message", "type", "param", "code"}
                assert r.headers.get("retry-after") == "1"
                # A running stream keeps producing.
                it = responses[0].aiter_lines()
                assert (await it.__anext__()).startswith("data: ")
            finally:
                await asyncio.gather(*(cm.__aexit__(None, None, None) for cm in ctxs))

    asyncio.run(run())
    wait_idle(server, timeout=30)
    r = client(server).completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None


# -- bad requests -----------------------------------------------------------------------------

LONG = [1] * 9000
BAD: list[tuple[str, str, Any, int, str | None, tuple[str, ...]]] = [
    # (name, path, body (dict, or bytes sent raw), status, param, words the message must contain)
    ("invalid json", "/v1/completions", b'{"prompt": "hi",', 400, None, ("JSON",)),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, ("object",)),
    ("missing prompt", "/v1/completions", {"model": MODEL_NAME}, 400, "prompt", ("prompt",)),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt", ("prompt",)),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", ("empty",)),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", ("max_tokens",)),
    ("max_tokens wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens", ()),
    ("huge max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens",
     ("8192", str(10**9))),
    ("temperature < 0", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", ()),
    ("top_p > 1", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", ()),
    ("top_k < -1", "/v1/completions", {"prompt": "hi", "top_k": -7}, 400, "top_k", ()),
    ("n over the limit", "/v1/completions", {"prompt": "hi", "n": 129}, 400, "n", ("128",)),
    ("unknown field", "/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate", ()),
    ("stop wrong type", "/v1/completions", {"prompt": "hi", "stop": 12}, 400, "stop", ()),
    ("stream wrong type", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", ()),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 2, 49152]}, 400, "prompt", ("49152",)),
    ("negative token id", "/v1/completions", {"prompt": [-1]}, 400, "prompt", ("-1",)),
    ("over-long prompt", "/v1/completions", {"prompt": LONG}, 400, "prompt", ("9000", "8192")),
    ("prompt + max_tokens over context", "/v1/completions", {"prompt": [1] * 8000, "max_tokens": 500},
     400, "max_tokens", ("8000", "500", "8192")),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model", ("gpt-9",)),
    ("stream_options without stream", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options", ()),
    ("chat missing messages", "/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages", ()),
    ("chat empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages", ()),
    ("chat bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages", ("role",)),
    ("chat unknown model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", ()),
    ("chat max_tokens 0", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", ()),
    ("body too large", "/v1/completions", {"prompt": "x" * 300_000}, 413, None, ("bytes",)),
]


@pytest.mark.parametrize("name,path,body,status,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server: Server, name: str, path: str, body: Any, status: int, param: str | None,
                     words: tuple[str, ...]) -> None:
    headers = {**server.headers, "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    for w in words:
        assert w in err["message"], (w, err["message"])


def test_unknown_route_and_method(server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/nothing", headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/completions", headers=server.headers)
    assert r.status_code == 405 and "error" in r.json()


def test_server_answers_normally_after_bad_requests(server: Server) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="hi")
    r = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 3  # type: ignore[union-attr]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.proc.poll() is None


# -- security ---------------------------------------------------------------------------------

ROUTES = [("GET", "/v1/models", None), ("GET", "/version", None), ("GET", "/metrics", None),
          ("GET", "/v1/backends", None),
          ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_api_key_required(server: Server, method: str, path: str, body: Any) -> None:
    url = f"{server.url}{path}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Bearer {API_KEY}x"}):
        r = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.request(method, url, json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text


def test_health_needs_no_key(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_client_with_wrong_key(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()


# -- information routes -----------------------------------------------------------------------


def test_models_and_version(server: Server) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    v = httpx.get(f"{server.url}/version", headers=server.headers).json()
    assert v["version"] and v["sagellm_core"]


def test_backends_lists_plugin_distribution(server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/backends", headers=server.headers).json()
    by_name = {b["name"]: b for b in r["backends"]}
    fake = by_name["fakehw"]
    assert fake["distribution"] == "fakebackend" and fake["version"] == "0.1"
    assert fake["available"] is False and "no fake accelerator" in fake["reason"]
    assert by_name["cpu"]["available"] is True and by_name["cpu"]["distribution"] == "sagellm-core"
    assert r["serving"]["name"] == serving_backend()


def test_metrics_parse_and_move(server: Server) -> None:
    wait_idle(server)
    before = metrics(server)
    for name in ("sagellm:num_requests_running", "sagellm:num_requests_waiting", "sagellm:kv_cache_usage_perc",
                 "sagellm:prompt_tokens_total", "sagellm:generation_tokens_total",
                 "sagellm:time_to_first_token_seconds_count", "sagellm:inter_token_latency_seconds_count",
                 "sagellm:e2e_request_latency_seconds_count"):
        assert name in before, name
    r = client(server).completions.create(model=MODEL_NAME, prompt="One two three", max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    after = wait_idle(server)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    assert d["sagellm:generation_tokens_total"] == 4
    assert d["sagellm:prompt_tokens_total"] == r.usage.prompt_tokens  # type: ignore[union-attr]
    assert d["sagellm:time_to_first_token_seconds_count"] == 1
    assert d["sagellm:inter_token_latency_seconds_count"] == 3
    assert d["sagellm:e2e_request_latency_seconds_count"] == 1
    assert d["sagellm:request_success_total{finished_reason=length}"] == 1
    assert after["sagellm:time_to_first_token_seconds_sum"] > before["sagellm:time_to_first_token_seconds_sum"]


def test_throughput_log_line(server: Server) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "generation throughput" in server.log_text():
            break
        time.sleep(0.5)
    line = next(ln for ln in server.log_text().splitlines() if "generation throughput" in ln)
    for part in ("prompt throughput", "tokens/s", "running", "waiting", "KV usage"):
        assert part in line


# -- structured output and logprobs through the real engine (embedded SmolLM2) ------------------


class Capital(BaseModel):
    city: str = Field(max_length=24)


def test_sdk_parse_returns_a_valid_object(server: Server) -> None:
    done = client(server).beta.chat.completions.parse(
        model=MODEL_NAME, response_format=Capital, temperature=0, max_tokens=96,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}])
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.city.strip()
    assert done.choices[0].finish_reason == "stop"


def test_regex_and_choice_constrain_the_real_model(server: Server) -> None:
    c = client(server)
    out = c.completions.create(model=MODEL_NAME, prompt="The year is", max_tokens=12,
                               temperature=0, extra_body={"structured_outputs": {"regex": r" [12][0-9]{3}"}})
    assert re.fullmatch(r" [12][0-9]{3}", out.choices[0].text), out.choices[0].text
    out = c.chat.completions.create(
        model=MODEL_NAME, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Is the sky blue? yes or no"}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].message.content in ("yes", "no")
    bad = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json={
        "model": MODEL_NAME, "prompt": "x", "structured_outputs": {"grammar": "start: ("}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs"


def test_chat_logprobs_are_the_models_own(server: Server) -> None:
    out = client(server).chat.completions.create(
        model=MODEL_NAME, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "Say hello."}])
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
