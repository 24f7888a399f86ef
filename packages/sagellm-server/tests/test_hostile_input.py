"""Hostile request bodies against the app (a scripted engine, in process): every one is a 4xx
that names the field, never a 500, and the server serves normally afterwards."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_engine import FakeEngine, FakeTokenizer
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_server.app import ServerConfig, create_app
from sagellm_server.async_engine import AsyncEngine
from sagellm_server.metrics import ServerMetrics

MSG = [{"role": "user", "content": "hi"}]


def make_client(tokenizer: Any = None, **config: Any) -> TestClient:
    metrics = ServerMetrics("fake")
    aeng = AsyncEngine(FakeEngine(), max_num_seqs=8, max_queued_requests=8, metrics=metrics)
    cfg = ServerConfig(served_model_name="fake", log_interval=0, **{"max_model_len": 64, "vocab_size": 1000,
                                                                   **config})
    app = create_app(aeng, cfg, tokenizer or FakeTokenizer(), metrics)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def post(client: TestClient, path: str, raw: bytes) -> Any:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


# (name, path, raw body, param, words in the message). Raw bytes, because the point is what
# Python's json accepts and Unicode or our models do not.
HOSTILE: list[tuple[str, str, bytes, str | None, tuple[str, ...]]] = [
    ("lone surrogate in prompt", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}',
     "prompt", ("surrogate", "'prompt'")),
    ("lone surrogate in a prompt list", "/v1/completions", b'{"prompt": ["ok", "\\udfff"]}',
     "prompt", ("'prompt.1'",)),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x\\uDBFF"}]}', "messages", ("'messages.0.content'",)),
    ("lone surrogate in a content part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages", ("messages.0.content.0.text",)),
    ("lone surrogate in the model name", "/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}',
     "model", ("surrogate",)),
    ("lone surrogate in a stop string", "/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}',
     "stop", ("stop.0",)),
    ("lone surrogate in a key", "/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', None, ("key",)),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', None, ("NaN",)),
    ("Infinity", "/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', None, ("Infinity",)),
    ("-Infinity", "/v1/completions", b'{"prompt": "hi", "temperature": -Infinity}', None, ("Infinity",)),
    ("a float that overflows", "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', None,
     ("out of range",)),
    ("an integer of 5000 digits", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", None, ("JSON",)),
    ("deep nesting", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     ("nested",)),
    ("huge seed", "/v1/completions", b'{"prompt": "hi", "seed": ' + str(10**30).encode() + b"}", "seed",
     ("seed",)),
    ("repetition_penalty past the sampler's bound", "/v1/completions",
     b'{"prompt": "hi", "repetition_penalty": 5}', "repetition_penalty", ("repetition_penalty", "2")),
    ("huge top_k", "/v1/completions", b'{"prompt": "hi", "top_k": ' + str(10**30).encode() + b"}", "top_k",
     ("top_k",)),
    ("huge stop token id", "/v1/completions",
     b'{"prompt": "hi", "stop_token_ids": [' + str(10**30).encode() + b"]}", "stop_token_ids", ("vocabulary",)),
    ("huge min_tokens", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": 4, "min_tokens": ' + str(10**30).encode() + b"}", "min_tokens",
     ("min_tokens",)),
    ("huge max_tokens", "/v1/completions",
     b'{"prompt": "hi", "max_tokens": ' + str(10**30).encode() + b"}", "max_tokens", ("max_tokens",)),
    ("huge token id", "/v1/completions", b'{"prompt": [' + str(10**30).encode() + b"]}", "prompt",
     ("vocabulary",)),
    ("parallel_tool_calls as a string", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", '
     b'"tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": "no"}',
     "parallel_tool_calls", ("parallel_tool_calls",)),
    # Bounds of the structured-output constraint itself (once a 500: an uncaught ValidationError).
    ("an empty regex", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": ""}}',
     "structured_outputs", ("structured_outputs", "regex")),
    ("an empty choice", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"choice": ["a", ""]}}',
     "structured_outputs", ("structured_outputs", "empty")),
    ("an empty grammar", "/v1/completions", b'{"prompt": "hi", "structured_outputs": {"grammar": ""}}',
     "structured_outputs", ("structured_outputs",)),
    ("choices over 64 KiB of UTF-8", "/v1/completions",
     json.dumps({"prompt": "hi", "structured_outputs": {"choice": ["\u00e9" * 1000] * 40}}).encode(),
     "structured_outputs", ("structured_outputs",)),
    ("a schema over 64 KiB", "/v1/chat/completions",
     json.dumps({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
         "name": "s", "schema": {"type": "object", "description": "x" * 70_000}}}}).encode(),
     "response_format", ("response_format",)),
    # /v1/tokenize: fields of the messages form sent with a prompt would change nothing.
    ("add_generation_prompt with a prompt", "/v1/tokenize",
     b'{"prompt": "hi", "add_generation_prompt": false}', "add_generation_prompt",
     ("add_generation_prompt", "'messages' only")),
    ("chat_template with a prompt", "/v1/tokenize", b'{"prompt": "hi", "chat_template": "x"}',
     "chat_template", ("'messages' only",)),
    ("add_special_tokens with messages", "/v1/tokenize",
     b'{"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": true}',
     "add_special_tokens", ("'prompt' only",)),
    ("a megabyte model name", "/v1/completions", json.dumps({"model": "m" * 1_000_000, "prompt": "x"}).encode(),
     "model", ("does not exist",)),
]


@pytest.mark.parametrize("name,path,raw,param,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_is_a_4xx_naming_the_field(client: TestClient, name: str, path: str, raw: bytes,
                                                 param: str | None, words: tuple[str, ...]) -> None:
    r = post(client, path, raw)
    assert 400 <= r.status_code < 500, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], (w, err["message"][:300])
    assert len(r.content) < 2000  # nothing big is echoed back


def test_valid_surrogate_pair_is_fine(client: TestClient) -> None:
    r = post(client, "/v1/completions", b'{"prompt": [1, 2], "max_tokens": 2, "stop": ["\\ud83d\\ude00"]}')
    assert r.status_code == 200, r.text
    r = post(client, "/v1/chat/completions",  # the fake tokenizer's ids are code points: 128512
             b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}')
    assert r.status_code == 400 and "128512" in r.json()["error"]["message"], r.text


HOSTILE_TEMPLATES = {
    "string repetition": "{% set s = 'x' * 200000000 %}{{ s }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge output": "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "raises": "{{ raise_exception('no') }}",
    "syntax error": "{% if %}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_hostile_request_chat_template_is_a_400(client: TestClient, template: str) -> None:
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json={"messages": MSG, "chat_template": template})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "chat_template" and err["code"] == "invalid_chat_template", err
    assert "chat template" in err["message"]
    assert time.monotonic() - t0 < 30  # the render's own limit is 2 s; slack for a busy machine


def test_request_chat_templates_can_be_refused() -> None:
    with make_client(allow_request_chat_template=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSG, "chat_template": "{{ messages }}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
        assert "--no-request-chat-template" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}).status_code == 200


def test_server_serves_normally_after_hostile_bodies(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "3 4"
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2,
                                                  "chat_template": "{{ messages[0].content }}!"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


# -- fuzzing: whatever the body, never a 5xx ----------------------------------------------

# Plain text, plus the strings that broke things: lone surrogates, empty, long.
_text = st.one_of(st.text(alphabet=st.characters(exclude_categories=()), max_size=20),
                  st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "", "fake", "x" * 5000]))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                     st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30]),
                     st.floats(allow_nan=True, allow_infinity=True), _text)
_json = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(_text, kids, max_size=4)),
                     max_leaves=12)
_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_tokens", "stop", "stop_token_ids",
           "seed", "n", "stream", "stream_options", "logit_bias", "presence_penalty",
           "max_completion_tokens", "chat_template", "add_generation_prompt", "ignore_eos",
           "return_token_ids", "echo", "logprobs", "best_of", "suffix", "tools", "user"]
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _text},
                                 optional={"content": _json | _text, "name": _json})
_valid_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                        "content": _text})
# A few fields at a time: with many, one always fails validation first and hides the rest.
_bodies = st.builds(lambda base, extra: {**base, **extra},
                    st.fixed_dictionaries({"messages": st.lists(_valid_message, min_size=1, max_size=3)
                                           | st.lists(_message, max_size=3),
                                           "prompt": st.sampled_from(["hi", [1, 2, 3], ["a", "b"]]) | _text
                                           | _json | st.lists(st.integers(-5, 2000), max_size=5)}),
                    st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=2))


def _encode(body: dict[str, Any]) -> bytes:
    # json.dumps writes NaN/Infinity and lone surrogates as escapes: exactly the hostile forms.
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def real_client() -> Iterator[TestClient]:
    """The scripted engine behind SmolLM2's real tokenizer and chat template: Rust tokenizers
    and Jinja fail in ways the fake tokenizer does not (a lone surrogate, for one)."""
    from transformers import AutoTokenizer

    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    tok = AutoTokenizer.from_pretrained(gguf_to_hf_dir(default_model_path()))
    with make_client(tok, vocab_size=len(tok), max_model_len=8192) as c:
        yield c


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_never_give_a_5xx(real_client: TestClient, body: dict[str, Any], path: str) -> None:
    r = post(real_client, path, _encode(body))
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
