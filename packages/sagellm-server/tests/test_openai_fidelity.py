"""The OpenAI API as the ``openai`` SDK uses it, against the app over a scripted engine (in
process, fast): n, logprobs (chat and completions formats), echo, penalties and logit_bias,
response_format and structured outputs, tools, tokenize; every refused or unknown field is a 400
naming it, before the engine sees anything."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from scripted_engine import CharTokenizer, ScriptedEngine

from sagellm_server.app import ServerConfig, create_app
from sagellm_server.async_engine import AsyncEngine
from sagellm_server.metrics import ServerMetrics
from sagellm_server.openai_protocol import CHAT_REFUSED, ChatCompletionRequest, CompletionRequest

MODEL = "fake"


def make(**config: Any) -> tuple[TestClient, ScriptedEngine]:
    engine = ScriptedEngine()
    metrics = ServerMetrics(MODEL)
    aeng = AsyncEngine(engine, max_num_seqs=256, max_queued_requests=256, metrics=metrics)
    cfg = ServerConfig(served_model_name=MODEL, max_model_len=4096, vocab_size=1000, log_interval=0,
                       **config)
    return TestClient(create_app(aeng, cfg, CharTokenizer(), metrics), raise_server_exceptions=False), engine


class _Compiler:
    """The grammar compiler as the app sees it, for the scripted engine's character tokenizer
    (which llguidance cannot read): refuses what fails to compile as a regex, accepts the rest.
    Real compilation is tested in core (test_structured_*) and through a real server
    (test_server.py)."""

    def validate(self, params: Any) -> None:
        import re

        if params.regex is not None:
            try:
                re.compile(params.regex)
            except re.error as exc:
                raise ValueError(f"the regex does not compile: {exc}") from None
        t = (params.json_schema or {}).get("type")
        if t is not None and not isinstance(t, (str, list)):
            raise ValueError("the schema's 'type' must be a string or a list")


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[TestClient, ScriptedEngine]]:
    http, engine = make()
    with pytest.MonkeyPatch.context() as mp, http:
        mp.setattr("sagellm_server.app.compiler_for", lambda *a, **k: _Compiler())
        yield http, engine


@pytest.fixture(scope="module")
def client(app: tuple[TestClient, ScriptedEngine]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=app[0], max_retries=0)


@pytest.fixture
def engine(app: tuple[TestClient, ScriptedEngine]) -> ScriptedEngine:
    app[1].added.clear()
    return app[1]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- every SDK field is declared -----------------------------------------------------------------


def _sdk_fields(module: Any) -> set[str]:
    import typing

    return set(typing.get_type_hints(module.CompletionCreateParamsBase)) | {"stream"}


def test_every_sdk_field_is_declared() -> None:
    from openai.types import completion_create_params as cp
    from openai.types.chat import completion_create_params as ccp

    assert _sdk_fields(ccp) <= set(ChatCompletionRequest.model_fields)
    assert _sdk_fields(cp) <= set(CompletionRequest.model_fields)


# -- n, logprobs, echo ---------------------------------------------------------------------------


def test_chat_n_and_logprobs(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("REPLY:abc"), n=3, logprobs=True,
                                       top_logprobs=2, seed=1, presence_penalty=0.5,
                                       frequency_penalty=-0.5, logit_bias={"65": 5, "66": -100},
                                       extra_body={"repetition_penalty": 1.2, "min_p": 0.1, "top_k": 5})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == "abc" and c.finish_reason == "stop"
        assert c.logprobs is not None and [t.token for t in c.logprobs.content] == ["a", "b", "c"]
        first = c.logprobs.content[0]
        assert first.logprob == -0.5 and first.bytes == [ord("a")]
        assert [(t.token, t.logprob) for t in first.top_logprobs] == [("b", -1.0), ("c", -2.0)]
    assert r.usage.completion_tokens == 9
    (_, _, params, _), = engine.added
    assert (params.n, params.logprobs, params.presence_penalty, params.frequency_penalty) == (3, 2, 0.5, -0.5)
    assert params.logit_bias == {65: 5.0, 66: -100.0}
    assert (params.repetition_penalty, params.min_p, params.top_k, params.seed) == (1.2, 0.1, 5, 1)


def test_chat_stream_n_and_logprobs(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=user("REPLY:xy"), n=2, logprobs=True,
                                            stream=True, stream_options={"include_usage": True})
    text: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                tokens[c.index] += [t.token for t in c.logprobs.content]
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert text == {0: "xy", 1: "xy"} and tokens == {0: ["x", "y"], 1: ["x", "y"]}
    assert finish == {0: "stop", 1: "stop"} and usage is not None and usage.completion_tokens == 4


def test_completions_n_times_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["REPLY:ab", "REPLY:cd"], n=2, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["ab", "ab", "cd", "cd"]


def test_completions_logprobs_format(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="REPLY:ab", logprobs=1, max_tokens=5)
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.tokens == ["a", "b"] and lp.token_logprobs == [-0.5, -0.5] and lp.text_offset == [0, 1]
    assert lp.top_logprobs == [{"b": -1.0, "a": -0.5}, {"c": -1.0, "b": -0.5}]


def test_echo_logprobs_max_tokens_0_as_lm_eval_asks(client: openai.OpenAI) -> None:
    prompt = "REPLY:q"
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    assert c.text == prompt
    assert c.logprobs.tokens == list(prompt) and c.logprobs.token_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == [-0.5] * (len(prompt) - 1)
    assert c.logprobs.text_offset == list(range(len(prompt)))
    assert r.usage.completion_tokens == 0
    # max_tokens=1 (lm-eval's local-completions): the prompt, then the one generated token.
    r = client.completions.create(model=MODEL, prompt=[ord(x) for x in prompt], echo=True, logprobs=1,
                                  max_tokens=1)
    c = r.choices[0]
    assert c.text == prompt + "q" and len(c.logprobs.tokens) == len(prompt) + 1


def test_echo_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="REPLY:ok", echo=True, max_tokens=4,
                                            stream=True, logprobs=0))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "REPLY:okok"
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(toks) == text


# -- structured output ---------------------------------------------------------------------------


class Answer(BaseModel):
    city: str
    population: int


def test_parse_with_a_pydantic_model(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    reply = json.dumps({"city": "Paris", "population": 2}).replace("|", "")
    r = client.beta.chat.completions.parse(model=MODEL, messages=user("REPLY:" + reply),
                                           response_format=Answer)
    assert r.choices[0].message.parsed == Answer(city="Paris", population=2)
    so = engine.added[0][2].structured_output
    assert so.json_schema is not None and so.json_schema["properties"]["city"]["type"] == "string"
    assert so.strict is True


def test_json_object_and_extension(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    client.chat.completions.create(model=MODEL, messages=user("REPLY:{}"), response_format={"type": "json_object"})
    assert engine.added[-1][2].structured_output.json_object is True
    client.completions.create(model=MODEL, prompt="REPLY:b", max_tokens=3,
                              extra_body={"structured_outputs": {"choice": ["a", "b"]}})
    assert engine.added[-1][2].structured_output.choice == ["a", "b"]
    client.chat.completions.create(model=MODEL, messages=user("REPLY:x"), response_format={"type": "text"})
    assert engine.added[-1][2].structured_output is None


def test_bad_grammar_is_400_before_the_engine(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x"), response_format={
            "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "("}})
    assert e.value.body["param"] == "structured_outputs"
    assert engine.added == []


# -- tools ---------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_tool_round_trip(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("REPLY:" + CALL), tools=[WEATHER])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = "".join(map(chr, engine.added[-1][1]))
    assert prompt.startswith("[tools:get_weather;]")  # the tools reached the template
    messages = [*user("weather?"), c.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
                *user("REPLY:It is sunny.")]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r2.choices[0].message.content == "It is sunny." and r2.choices[0].finish_reason == "stop"
    prompt = "".join(map(chr, engine.added[-1][1]))
    assert '<tool_call>get_weather{"city": "Paris"}</tool_call>' in prompt and "tool>sunny|" in prompt


def test_tool_call_streaming_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=user("REPLY:Hi " + CALL), tools=[WEATHER],
                                            stream=True)
    content, name, args, ids, finish = "", None, "", set(), None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                if tc.id:
                    ids.add(tc.id)
                if tc.function and tc.function.name:
                    name = tc.function.name
                args += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    assert content == "Hi " and name == "get_weather" and len(ids) == 1
    assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls"


def test_tool_choice(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    client.chat.completions.create(model=MODEL, messages=user("REPLY:" + CALL), tools=[WEATHER],
                                   tool_choice="required")
    grammar = engine.added[-1][2].structured_output.grammar
    assert grammar is not None and grammar.splitlines()[0].startswith("start: one (")  # 1 or more
    client.chat.completions.create(model=MODEL, messages=user("REPLY:" + CALL), tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   parallel_tool_calls=False)
    grammar = engine.added[-1][2].structured_output.grammar
    assert grammar is not None and grammar.splitlines()[0] == "start: one"  # exactly one
    r = client.chat.completions.create(model=MODEL, messages=user("REPLY:" + CALL), tools=[WEATHER],
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == CALL
    assert not "".join(map(chr, engine.added[-1][1])).startswith("[tools:")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x"), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


STRICT_WEATHER = {"type": "function", "function": {**WEATHER["function"], "strict": True}}


def _chat(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": user("x"), **body})


def test_strict_tools_under_auto_constrain_calls() -> None:
    """A strict tool under tool_choice auto (or none given): the output is prose or calls held to
    the schemas (llama3_json style here; Hermes needs its tag as one token, tested in core)."""
    from sagellm_server.request_params import structured_output

    for choice in ({}, {"tool_choice": "auto"}):
        params, param = structured_output(_chat(tools=[STRICT_WEATHER], **choice), "llama3_json")
        assert params is not None and param == "tools"
        assert "prose:" in (params.grammar or "") and "start: prose | calls" in (params.grammar or "")
    one, _ = structured_output(_chat(tools=[STRICT_WEATHER], parallel_tool_calls=False), "llama3_json")
    assert one is not None and "calls: one\n" in (one.grammar or "") + "\n"
    # Not strict, tool_choice none, no tool parser, or a Hermes tag that is not one token
    # (the character tokenizer): calls stay unconstrained, as before.
    assert structured_output(_chat(tools=[WEATHER]), "llama3_json") == (None, "")
    assert structured_output(_chat(tools=[STRICT_WEATHER], tool_choice="none"), "llama3_json")[0] is None
    assert structured_output(_chat(tools=[STRICT_WEATHER]), None)[0] is None
    assert structured_output(_chat(tools=[STRICT_WEATHER]), "hermes", CharTokenizer())[0] is None
    # response_format constrains the answer instead (as before).
    rf, param = structured_output(_chat(tools=[STRICT_WEATHER], response_format={"type": "json_object"}),
                                  "llama3_json")
    assert rf is not None and rf.json_object and param == "response_format"


def test_strict_tool_from_the_sdk_round_trips(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    """``openai.pydantic_function_tool`` marks tools strict; on the scripted engine (Hermes tags
    spelled in characters) the call is parsed as before."""
    class GetWeather(BaseModel):
        city: str

    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    assert tool["function"].get("strict") is True
    r = client.chat.completions.create(model=MODEL, messages=user("REPLY:" + CALL), tools=[tool])
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert engine.added[-1][2].structured_output is None


# -- refused and unknown fields ------------------------------------------------------------------

REFUSED_VALUES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f"}], "function_call": "auto",
    "moderation": {"model": "x"}, "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
    "prompt_cache_options": {}, "prompt_cache_retention": "24h",
}
assert set(REFUSED_VALUES) == set(CHAT_REFUSED)


@pytest.mark.parametrize("field,value", [*REFUSED_VALUES.items(), ("store", True), ("service_tier", "priority"),
                                         ("modalities", ["text", "audio"])])
def test_refused_chat_field(app: tuple[TestClient, ScriptedEngine], field: str, value: Any) -> None:
    http, engine = app
    engine.added.clear()
    r = http.post("/v1/chat/completions", json={"messages": user("x"), field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    assert engine.added == []


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "nonsense": 1}, "nonsense"),
])
def test_refused_completion_field(app: tuple[TestClient, ScriptedEngine], body: dict[str, Any], param: str) -> None:
    r = app[0].post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_harmless_fields_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("REPLY:ok"), user="u1", metadata={"a": "b"},
                                       store=False, service_tier="auto", parallel_tool_calls=True,
                                       modalities=["text"], safety_identifier="s", prompt_cache_key="k",
                                       prediction={"type": "content", "content": "ok"},
                                       max_completion_tokens=8, extra_body={"cache_salt": "salt"})
    assert r.choices[0].message.content == "ok"


def test_cache_salt_reaches_the_engine(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    client.completions.create(model=MODEL, prompt="REPLY:a", extra_body={"cache_salt": "tenant-1"})
    assert engine.added[-1][3] == "tenant-1"


def test_unknown_field_names_it_and_lenient_mode_ignores_it() -> None:
    http, _ = make()
    with http:
        r = http.post("/v1/chat/completions", json={"messages": user("x"), "frobnicate": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
        assert r.json()["error"]["code"] == "unknown_field"
    http, _ = make(lenient_request_fields=True)
    with http:
        r = http.post("/v1/chat/completions", json={"messages": user("REPLY:ok"), "frobnicate": True})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
        r = http.post("/v1/chat/completions", json={"messages": user("x"), "store": True})
        assert r.status_code == 400  # known but not implemented: still refused


# -- hostile ---------------------------------------------------------------------------------------

DEEP: dict[str, Any] = {"type": "object"}
for _ in range(40):
    DEEP = {"type": "object", "properties": {"a": DEEP}}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(10**6)}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5000": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"n": 10**6}, "n"),
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 10}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x" * 5000, "echo": True, "logprobs": 5}, "prompt"),
    ("/v1/chat/completions", {"tools": [WEATHER] * 10**4}, "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
     "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "a", "schema": DEEP}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_hostile_refused_before_the_engine(path: str, body: dict[str, Any], param: str) -> None:
    http, engine = make(max_request_body_bytes=64 << 20)
    if path.endswith("chat/completions"):
        body = {"messages": user("x"), **body}
    with http:
        r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert engine.added == []


# -- tokenize, detokenize, models ------------------------------------------------------------------


def test_tokenize_detokenize(app: tuple[TestClient, ScriptedEngine]) -> None:
    http = app[0]
    r = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "abc"}).json()
    assert r == {"count": 3, "max_model_len": 4096, "tokens": [97, 98, 99]}
    r = http.post("/v1/tokenize", json={"messages": user("hi"), "tools": [WEATHER]}).json()
    assert "".join(map(chr, r["tokens"])) == "[tools:get_weather;]user>hi|"
    assert http.post("/v1/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    bad = http.post("/v1/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = http.post("/v1/tokenize", json={"prompt": "a", "messages": user("b")})
    assert bad.status_code == 400
    # add_generation_prompt (messages only) reaches the template; with a prompt it is refused.
    gen = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    for flag, text in ((None, "hi>"), (True, "hi>"), (False, "hi")):
        body = {"messages": user("hi"), "chat_template": gen,
                **({} if flag is None else {"add_generation_prompt": flag})}
        assert "".join(map(chr, http.post("/v1/tokenize", json=body).json()["tokens"])) == text
    bad = http.post("/v1/tokenize", json={"prompt": "a", "add_generation_prompt": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "add_generation_prompt"


def test_models_report_max_model_len(client: openai.OpenAI) -> None:
    (m,) = client.models.list().data
    assert m.id == MODEL and m.model_extra["max_model_len"] == 4096
