"""One request's failure finishes that request with an error; the engine and the others go on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sagellm import LLM
from sagellm.backends.cpu import CpuPlatform
from sagellm.engine.llm_engine import LLMEngine
from sagellm.errors import RequestError
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams

POISON = 311  # a token id no other prompt holds
PROMPTS = {
    "a": [5, 17, 42, 99, 123, 7, 250, 33, 8, 64],
    "c": [200, 201, 9, 14, 77, 3, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103],
}
PARAMS = {
    "a": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "b": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    # Seeded and sampled: a rerun of the step must not advance its random stream twice.
    "c": SamplingParams(temperature=0.9, top_k=40, seed=1234, max_tokens=12, ignore_eos=True),
}
B_PROMPT = [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]  # 15 tokens


@pytest.fixture
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(model=str(tiny_llama_dir), num_kv_blocks=64)


def run_all(engine: LLMEngine, requests: dict[str, list[int]]) -> dict[str, RequestOutput]:
    for rid, prompt in requests.items():
        engine.add_request(prompt, PARAMS[rid[0]], request_id=rid)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final, "a request finished twice"
                final[out.request_id] = out
    assert set(final) == set(requests)
    return final


@pytest.fixture
def clean(engine: LLMEngine) -> dict[str, list[int]]:
    outs = run_all(engine, {"a0": PROMPTS["a"], "b0": B_PROMPT, "c0": PROMPTS["c"]})
    return {rid[0]: o.token_ids for rid, o in outs.items()}


def assert_pool_returned(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.ref_counts == {} and bm.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests() and engine._seqs == {}


@pytest.fixture
def forward_raises(engine: LLMEngine) -> Iterator[list[object]]:
    """Make the model's forward raise when a condition holds for its ``(ids, positions, ctx)``."""
    conditions: list[object] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:  # type: ignore[type-arg]
        for cond in conditions:
            if cond(*args):  # type: ignore[operator]
                raise ValueError("poisoned batch")

    handle = engine.model.register_forward_pre_hook(hook)
    yield conditions
    handle.remove()


def test_a_prefill_that_raises_fails_only_its_request(engine: LLMEngine, clean, forward_raises,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    forward_raises.append(lambda ids, pos, ctx: bool((ids == POISON).any()))
    with caplog.at_level(logging.ERROR, logger="sagellm.engine"):
        outs = run_all(engine, {"a1": PROMPTS["a"], "b1": B_PROMPT + [POISON], "c1": PROMPTS["c"]})
    assert outs["a1"].token_ids == clean["a"] and outs["a1"].error is None
    assert outs["c1"].token_ids == clean["c"] and outs["c1"].finish_reason == "length"
    b = outs["b1"]
    assert b.finished and b.finish_reason == "error" and b.error == "ValueError: poisoned batch"
    assert b.token_ids == [] and b.new_token_ids == []
    assert_pool_returned(engine)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "b1" in errors[0].getMessage() and errors[0].exc_info
    # The engine keeps serving, and the poison still fails only its own request.
    again = run_all(engine, {"a2": PROMPTS["a"], "b2": [POISON, 1, 2]})
    assert again["a2"].token_ids == clean["a"] and again["b2"].finish_reason == "error"
    assert_pool_returned(engine)


def test_a_decode_that_raises_keeps_the_tokens_already_given(engine: LLMEngine, clean,
                                                            forward_raises) -> None:
    # B's prompt is 15 tokens; it fails on the step that writes its KV at position 17 (its third
    # decode, after three tokens were sampled). Identified by B's own KV slot, which no other
    # request's run touches.
    def writes_b_position_17(ids: torch.Tensor, pos: torch.Tensor, ctx) -> bool:  # type: ignore[no-untyped-def]
        seq = engine._seqs.get("b1")
        if seq is None or len(seq.block_table) < 2:
            return False
        slot = seq.block_table[1] * engine.config.block_size + 1
        return bool((ctx.attn_metadata.slot_mapping == slot).any())

    forward_raises.append(writes_b_position_17)
    outs = run_all(engine, {"a1": PROMPTS["a"], "b1": B_PROMPT, "c1": PROMPTS["c"]})
    assert outs["a1"].token_ids == clean["a"] and outs["c1"].token_ids == clean["c"]
    b = outs["b1"]
    assert b.finish_reason == "error" and b.error == "ValueError: poisoned batch"
    assert b.token_ids == clean["b"][:3]
    assert_pool_returned(engine)


def test_sampling_that_raises_after_drawing_keeps_seeded_streams(engine: LLMEngine, clean) -> None:
    runner = engine.runner
    real = runner.sampler

    def sampler(logits, batch):  # type: ignore[no-untyped-def]
        ids = real(logits, batch)  # draws from every seeded generator first
        if 0.5 in batch.temperatures:
            raise RuntimeError("sampler exploded")
        return ids

    runner.sampler = sampler  # type: ignore[assignment]
    PARAMS["b"], saved = SamplingParams(temperature=0.5, max_tokens=12, ignore_eos=True), PARAMS["b"]
    try:
        outs = run_all(engine, {"a1": PROMPTS["a"], "b1": B_PROMPT, "c1": PROMPTS["c"]})
    finally:
        PARAMS["b"] = saved
        runner.sampler = real
    assert outs["a1"].token_ids == clean["a"]
    assert outs["c1"].token_ids == clean["c"]  # the seeded request is unaffected
    assert outs["b1"].error == "RuntimeError: sampler exploded" and outs["b1"].token_ids == []
    assert_pool_returned(engine)


class _BrokenDetokenizer:
    def __init__(self, fail_on_call: int) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def step(self, token_ids: list[int]) -> str:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return "x"


def test_a_detokenizer_that_raises_fails_only_its_request(engine: LLMEngine, clean) -> None:
    for rid, prompt in (("a1", PROMPTS["a"]), ("b1", B_PROMPT), ("c1", PROMPTS["c"])):
        engine.add_request(prompt, PARAMS[rid[0]], request_id=rid)
    engine._detok["b1"] = _BrokenDetokenizer(fail_on_call=4)  # type: ignore[assignment]
    final: dict[str, RequestOutput] = {}
    b_stream: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "b1":
                b_stream += out.new_token_ids
            if out.finished:
                final[out.request_id] = out
    assert final["a1"].token_ids == clean["a"] and final["c1"].token_ids == clean["c"]
    b = final["b1"]
    assert b.finish_reason == "error" and b.error.startswith("UnicodeDecodeError: ")
    # Three tokens were streamed; the fourth, whose post-processing failed, is not in the output.
    assert b_stream == b.token_ids == clean["b"][:3] and b.text == "xxx"
    assert_pool_returned(engine)


def test_a_fatal_error_stops_the_engine(engine: LLMEngine, forward_raises) -> None:
    def cuda_fault(*args: object) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    forward_raises.append(cuda_fault)
    engine.add_request(PROMPTS["a"], PARAMS["a"])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()


def test_the_platform_decides_what_is_fatal(engine: LLMEngine, forward_raises,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    forward_raises.append(lambda ids, pos, ctx: bool((ids == POISON).any()))
    monkeypatch.setattr(engine.platform, "is_fatal_error", lambda exc: isinstance(exc, ValueError))
    engine.add_request(PROMPTS["a"], PARAMS["a"])
    engine.add_request([POISON, 3], PARAMS["a"])
    with pytest.raises(ValueError, match="poisoned"):
        engine.step()


def test_default_fatal_classification() -> None:
    p = CpuPlatform()
    assert p.is_fatal_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert p.is_fatal_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert not p.is_fatal_error(torch.OutOfMemoryError("CUDA out of memory. CUDA error: x"))
    assert not p.is_fatal_error(MemoryError())
    assert not p.is_fatal_error(ValueError("bad value"))
    assert not p.is_fatal_error(RuntimeError("Overflow when unpacking long long"))


def test_llm_generate_raises_naming_the_failed_request(tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=64)
    eng = llm.engine
    sp = PARAMS["a"]
    expected = llm.generate([PROMPTS["a"]], sp, use_tqdm=False)[0].token_ids

    def hook(module: torch.nn.Module, args: tuple) -> None:  # type: ignore[type-arg]
        if bool((args[0] == POISON).any()):
            raise ValueError("poisoned batch")

    handle = eng.model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(RequestError) as info:
            llm.generate([PROMPTS["a"], [POISON, 2, 3], PROMPTS["c"]], sp, use_tqdm=False)
        err = info.value
        assert err.index == 1 and err.error == "ValueError: poisoned batch"
        assert err.request_id in str(err) and "prompt 1" in str(err)
        assert err.output is not None and err.output.finish_reason == "error"
        assert_pool_returned(eng)  # the other two were aborted
        assert llm.generate([PROMPTS["a"]], sp, use_tqdm=False)[0].token_ids == expected
    finally:
        handle.remove()


def test_a_fatal_error_in_post_processing_stops_the_engine(engine: LLMEngine) -> None:
    class _DeviceLost:
        def step(self, token_ids: list[int]) -> str:
            raise RuntimeError("CUDA error: device-side assert triggered")

    rid = engine.add_request(PROMPTS["a"], PARAMS["a"])
    engine._detok[rid] = _DeviceLost()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="device-side assert"):
        engine.step()
