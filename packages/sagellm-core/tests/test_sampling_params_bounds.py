"""Every SamplingParams field at its hostile extremes: rejected naming the field, or a correct step.

A value that passes validation must run through a real engine step (which, before the bounds,
could raise ``Overflow when unpacking long long`` inside ``step()`` and stop the engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sagellm import sampling_params as sp_mod
from sagellm.engine.llm_engine import LLMEngine
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams

PROMPT = [5, 17, 42, 99, 123, 7, 250]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    # A short context so "generate up to 2**31 - 1 tokens" ends quickly, at the context limit.
    return LLMEngine(model=str(tiny_llama_dir), num_kv_blocks=64, max_model_len=48)


def run(engine: LLMEngine, params: SamplingParams, prompt: list[int] = PROMPT) -> RequestOutput:
    rid = engine.add_request(prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None
    assert engine.block_manager.num_free_blocks == engine.kv.num_blocks
    return final


def rejected(field: str, **kwargs: Any) -> str:
    """Assert ``SamplingParams(**kwargs)`` fails naming ``field``; returns the message."""
    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)], errors
    return str(errors[0]["msg"])


def greedy_tokens(engine: LLMEngine, n: int = 10) -> list[int]:
    return run(engine, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).token_ids


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 5e-324, 1e-8])
def test_tiny_temperature_samples_the_greedy_tokens(engine: LLMEngine, temperature: float) -> None:
    out = run(engine, SamplingParams(temperature=temperature, max_tokens=10, ignore_eos=True, seed=3))
    assert out.token_ids == greedy_tokens(engine)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-9, sp_mod.MAX_TEMPERATURE * 1.01])
def test_temperature_out_of_range_is_rejected(value: float) -> None:
    rejected("temperature", temperature=value)


def test_largest_temperature_runs(engine: LLMEngine) -> None:
    out = run(engine, SamplingParams(temperature=sp_mod.MAX_TEMPERATURE, max_tokens=6, ignore_eos=True))
    assert len(out.token_ids) == 6 and all(0 <= t < engine.vocab_size for t in out.token_ids)


def test_tiny_top_p_keeps_only_the_top_token(engine: LLMEngine) -> None:
    out = run(engine, SamplingParams(temperature=1.0, top_p=1e-300, max_tokens=10, ignore_eos=True))
    assert out.token_ids == greedy_tokens(engine)


@pytest.mark.parametrize("value", [float("nan"), 0.0, 1.0000001, float("inf")])
def test_top_p_out_of_range_is_rejected(value: float) -> None:
    rejected("top_p", top_p=value)


def test_top_k_above_the_vocabulary_means_the_whole_vocabulary(engine: LLMEngine) -> None:
    base = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=11)
    whole = run(engine, base).token_ids
    for k in (engine.vocab_size, engine.vocab_size + 1, sp_mod.MAX_TOP_K):
        assert run(engine, base.model_copy(update={"top_k": k})).token_ids == whole


def test_top_k_too_large_is_rejected() -> None:
    rejected("top_k", top_k=10**20)
    rejected("top_k", top_k=sp_mod.MAX_TOP_K + 1)
    rejected("top_k", top_k=-2)


def test_seed_extremes_run_and_negative_seeds_wrap(engine: LLMEngine) -> None:
    base = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for seed in (sp_mod.MIN_SEED, -1, 0, 2**63, sp_mod.MAX_SEED):
        out = run(engine, base.model_copy(update={"seed": seed}))
        assert len(out.token_ids) == 8
        tokens[seed] = out.token_ids
        # Seeded: the same seed gives the same tokens in a second run.
        assert run(engine, base.model_copy(update={"seed": seed})).token_ids == out.token_ids
    # torch takes seeds modulo 2**64.
    assert tokens[-1] == tokens[sp_mod.MAX_SEED]
    assert tokens[sp_mod.MIN_SEED] == tokens[2**63]


def test_seed_out_of_range_is_rejected() -> None:
    rejected("seed", seed=2**70)
    rejected("seed", seed=sp_mod.MAX_SEED + 1)
    rejected("seed", seed=sp_mod.MIN_SEED - 1)


def test_largest_max_and_min_tokens_stop_at_the_context(engine: LLMEngine) -> None:
    big = sp_mod.MAX_TOKENS_LIMIT
    out = run(engine, SamplingParams(temperature=0, max_tokens=big, min_tokens=big))
    assert out.finish_reason == "length"
    assert out.num_prompt_tokens + out.num_output_tokens == engine.max_model_len
    assert not set(out.token_ids[:-1]) & engine.eos_token_ids


def test_token_counts_out_of_range_are_rejected() -> None:
    rejected("max_tokens", max_tokens=sp_mod.MAX_TOKENS_LIMIT + 1)
    rejected("max_tokens", max_tokens=0)
    rejected("min_tokens", min_tokens=sp_mod.MAX_TOKENS_LIMIT + 1,
             max_tokens=sp_mod.MAX_TOKENS_LIMIT)
    rejected("min_tokens", min_tokens=-1)
    assert "exceeds max_tokens" in rejected("min_tokens", min_tokens=5, max_tokens=2)


def test_stop_token_ids_past_the_vocabulary_run_with_min_tokens(engine: LLMEngine) -> None:
    free = greedy_tokens(engine)
    ids = [engine.vocab_size, engine.vocab_size + 7, sp_mod.MAX_TOKEN_ID, free[3]]
    out = run(engine, SamplingParams(temperature=0, max_tokens=10, min_tokens=2, ignore_eos=True,
                                     stop_token_ids=ids))
    first = free.index(free[3])
    assert out.token_ids == free[: first + 1] and out.stop_reason == free[3]


def test_stop_token_ids_out_of_range_are_rejected() -> None:
    rejected("stop_token_ids", stop_token_ids=[-1])
    rejected("stop_token_ids", stop_token_ids=[sp_mod.MAX_TOKEN_ID + 1])
    rejected("stop_token_ids", stop_token_ids=[2**64])
    rejected("stop_token_ids", stop_token_ids=list(range(sp_mod.MAX_STOP_TOKEN_IDS + 1)))
    assert len(SamplingParams(stop_token_ids=list(range(sp_mod.MAX_STOP_TOKEN_IDS))).stop_token_ids) \
        == sp_mod.MAX_STOP_TOKEN_IDS


def test_stop_strings_at_their_limits_run(smol_llm) -> None:  # type: ignore[no-untyped-def]
    eng: LLMEngine = smol_llm.engine
    prompt = "The capital of France is"
    ref = smol_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    word = ref.text.split()[1]
    long_stops = [chr(0x4E00 + i) * sp_mod.MAX_STOP_STRING_CHARS for i in range(sp_mod.MAX_STOP_STRINGS - 1)]
    params = SamplingParams(temperature=0, max_tokens=12, stop=[*long_stops, word])
    rid = eng.add_request(prompt, params)
    streamed, final = "", None
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed += out.new_text
            final = out if out.request_id == rid else final
    assert final is not None and final.finished and final.stop_reason == word
    assert streamed == final.text == ref.text[: ref.text.index(word)]


def test_stop_strings_beyond_their_limits_are_rejected() -> None:
    rejected("stop", stop=["x"] * (sp_mod.MAX_STOP_STRINGS + 1))
    assert "characters" in rejected("stop", stop=["x" * (sp_mod.MAX_STOP_STRING_CHARS + 1)])
    rejected("stop", stop=[""])


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2.0001, -2.0001])
def test_presence_and_frequency_penalty_out_of_range_are_rejected(field: str, value: float) -> None:
    rejected(field, **{field: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0,
                                   sp_mod.MAX_REPETITION_PENALTY * 1.01])
def test_repetition_penalty_out_of_range_is_rejected(value: float) -> None:
    rejected("repetition_penalty", repetition_penalty=value)


def test_logit_bias_out_of_range_is_rejected() -> None:
    assert "entries" in rejected("logit_bias", logit_bias={i: 1.0 for i in range(10**6)})
    rejected("logit_bias", logit_bias={i: 1.0 for i in range(sp_mod.MAX_LOGIT_BIAS + 1)})
    rejected("logit_bias", logit_bias={-1: 1.0})
    rejected("logit_bias", logit_bias={sp_mod.MAX_TOKEN_ID + 1: 1.0})
    rejected("logit_bias", logit_bias={3: sp_mod.MAX_LOGIT_BIAS_VALUE + 0.5})
    rejected("logit_bias", logit_bias={3: float("nan")})
    rejected("logit_bias", logit_bias={3: -float("inf")})
    with pytest.raises(ValidationError) as info:  # a key that is no integer: the key's location
        SamplingParams(logit_bias={"x": 1.0})
    assert [e["loc"][0] for e in info.value.errors()] == ["logit_bias"]
    # JSON object keys are strings: "5" is token 5.
    assert SamplingParams(logit_bias={"5": 2}).logit_bias == {5: 2.0}


def test_logit_bias_past_the_vocabulary_is_refused_by_the_engine(engine: LLMEngine) -> None:
    from sagellm.prompt_validation import PromptError

    params = SamplingParams(logit_bias={3: 1.0, engine.vocab_size: 1.0})
    with pytest.raises(PromptError, match="logit_bias") as info:
        engine.add_request(PROMPT, params)
    assert info.value.param == "logit_bias" and info.value.code == "invalid_value"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("value", [0, -1, sp_mod.MAX_N + 1, 10**9])
def test_n_out_of_range_is_rejected(value: int) -> None:
    rejected("n", n=value)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, sp_mod.MAX_LOGPROBS + 1, 10**9])
def test_logprobs_out_of_range_are_rejected(field: str, value: int) -> None:
    rejected(field, **{field: value})


@pytest.mark.parametrize("value", [float("nan"), -0.1, 1.01])
def test_min_p_out_of_range_is_rejected(value: float) -> None:
    rejected("min_p", min_p=value)


def test_new_fields_at_their_limits_run(engine: LLMEngine) -> None:
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=4, ignore_eos=True, min_p=1.0,
        presence_penalty=-sp_mod.MAX_ABS_PENALTY, frequency_penalty=sp_mod.MAX_ABS_PENALTY,
        repetition_penalty=sp_mod.MAX_REPETITION_PENALTY,
        logit_bias={i: (-1) ** i * sp_mod.MAX_LOGIT_BIAS_VALUE
                    for i in range(min(sp_mod.MAX_LOGIT_BIAS, engine.vocab_size))},
        logprobs=sp_mod.MAX_LOGPROBS, prompt_logprobs=sp_mod.MAX_LOGPROBS)
    out = run(engine, params)
    assert len(out.token_ids) == 4 and out.logprobs is not None
    assert all(len(lp.top) == sp_mod.MAX_LOGPROBS for lp in out.logprobs)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert all(lp is not None and len(lp.top) == sp_mod.MAX_LOGPROBS for lp in out.prompt_logprobs[1:])


def test_largest_n_runs(engine: LLMEngine) -> None:
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True, seed=1,
                                                    n=sp_mod.MAX_N))
    done = set()
    while engine.has_unfinished_requests():
        done |= {o.index for o in engine.step() if o.request_id == rid and o.finished}
    assert done == set(range(sp_mod.MAX_N))
    assert engine.block_manager.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize(("kw", "is_token", "suffices"), [
    ({}, True, True),
    ({"logprobs": 3}, True, False),  # reads the logits, changes nothing
    ({"logprobs": 0, "presence_penalty": 0.5}, False, False),
    ({"logit_bias": {1: 2.0}}, False, False),
    ({"min_tokens": 2}, False, False),
    ({"temperature": 0.7}, False, False),
])
def test_argmax_is_token_ignores_only_what_reads_the_logits(kw: dict, is_token: bool,  # type: ignore[type-arg]
                                                            suffices: bool) -> None:
    p = SamplingParams(**{"temperature": 0.0, **kw})
    assert (p.argmax_is_token, p.argmax_suffices) == (is_token, suffices)
