"""Structured output through the engine itself: ``SamplingParams.structured_output`` compiles off
the step loop, constrains every choice, finishes the request when the grammar is complete, and a
grammar that fails fails only its own request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.structured import StructuredOutputParams
from sagellm.testing.structured import schema_errors
from sagellm.testing.tiny_model import make_tiny_llama

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "c": {"enum": ["red", "blue"]}},
    "required": ["n", "c"], "additionalProperties": False,
}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """Steps waited for one by one, and asynchronous scheduling (the next mask filled on the
    worker after it accepts the pending token)."""
    torch.set_num_threads(1)
    d = make_tiny_llama(tmp_path_factory.mktemp("tiny-structured"), tokenizer=True)
    return LLM(model=str(d), num_kv_blocks=64, async_scheduling=request.param)


def sp(max_tokens: int = 80, **kw: Any) -> SamplingParams:
    so = StructuredOutputParams(**kw) if kw else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_output=so)


def test_schema_regex_and_choice_in_one_batch(llm: LLM) -> None:
    outs = llm.generate(["a", "b", "c", "d"], [sp(json_schema=SCHEMA), sp(regex=r"[ab]{3}x"),
                                               sp(choice=["yes", "no"]), sp(8)], use_tqdm=False)
    value = json.loads(outs[0].text)
    assert schema_errors(value, SCHEMA) == [] and outs[0].finish_reason == "stop"
    assert re.fullmatch(r"[ab]{3}x", outs[1].text) and outs[1].finish_reason == "stop"
    assert outs[2].text in ("yes", "no")
    free = llm.generate(["d"], sp(8), use_tqdm=False)[0]
    assert outs[3].token_ids == free.token_ids  # the unconstrained row is untouched


def test_every_choice_is_constrained(llm: LLM) -> None:
    # A bias against whitespace (which the grammar allows between JSON tokens) so the random
    # model finishes its object well inside the budget.
    space = {t: -8.0 for t in llm.tokenizer.encode(" \n\r\t", add_special_tokens=False)}
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=256, logit_bias=space,
                            structured_output=StructuredOutputParams(json_schema=SCHEMA))
    outs = llm.generate(["q"], params, use_tqdm=False)
    assert [o.index for o in outs] == [0, 1, 2]
    for o in outs:
        assert schema_errors(json.loads(o.text), SCHEMA) == []


def test_compiling_grammar_does_not_block_and_abort_works(llm: LLM) -> None:
    engine = llm.engine
    big = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(300)}}
    rid = engine.add_request("x", sp(json_schema=big))
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    # Admitted once compiled: the loop steps until it is done, never blocked on the compile.
    rid = engine.add_request("y", sp(40, json_schema={"type": "object", "properties": {
        f"j{i}": {"enum": [i]} for i in range(40)}, "required": ["j0"]}))
    outs: list[Any] = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    assert outs and outs[-1].finished and outs[-1].error is None


def test_bad_grammar_fails_only_its_request(llm: LLM) -> None:
    engine = llm.engine
    ok = engine.add_request("fine", sp(6))
    try:
        bad = engine.add_request("bad", sp(grammar="start: ( "))
    except ValueError as exc:  # refused up front (the compile finished at once)
        assert "grammar" in str(exc).lower()
        bad = None
    results: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                results[o.request_id] = o
    assert results[ok].error is None and len(results[ok].token_ids) == 6
    if bad is not None:
        assert results[bad].finish_reason == "error" and results[bad].error


def test_model_without_tokenizer_refuses_structured_output(tmp_path: Path) -> None:
    llm = LLM(model=str(make_tiny_llama(tmp_path / "notok")), num_kv_blocks=16)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([[5, 6, 7]], sp(json_object=True), use_tqdm=False)
    assert llm.generate([[5, 6, 7]], sp(4), use_tqdm=False)[0].finish_reason == "length"


def test_grammar_that_allows_only_a_stop_token_wins_over_min_tokens() -> None:
    """A row whose grammar leaves only end-of-sequence keeps it despite ``min_tokens`` (banning
    it would leave nothing to sample); an unconstrained row and a constrained row with other
    choices still have it banned."""
    from types import SimpleNamespace

    from sagellm.engine.model_runner import ModelRunner

    eos, vocab = 2, 8
    params = SimpleNamespace(min_tokens=5, stop_token_ids=[], ignore_eos=False)

    def seq(constrained: bool) -> SimpleNamespace:
        return SimpleNamespace(params=params, num_output_tokens=0, eos_token_ids={eos},
                               constraint=object() if constrained else None)

    logits = torch.zeros(3, vocab)
    logits[0] = float("-inf")
    logits[0, eos] = 1.5  # the grammar allows only EOS
    logits[2, 4:] = float("-inf")  # the grammar allows 0..3, EOS among them
    ModelRunner.suppress_early_stop(logits, [seq(True), seq(False), seq(True)])  # type: ignore[list-item]
    assert logits[0, eos].item() == 1.5
    assert torch.isneginf(logits[1, eos]) and torch.isneginf(logits[2, eos])
    assert torch.isfinite(logits[2, :eos]).all() and torch.isfinite(logits[1, eos + 1:]).all()
