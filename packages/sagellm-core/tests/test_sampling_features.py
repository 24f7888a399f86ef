"""Logprobs, prompt logprobs, penalties, logit bias, n > 1 and token constraints, end to end.

Logprobs are checked against transformers' fp32 logits of the same checkpoint (an independent
implementation of the model), not against the engine itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sagellm import LLM
from sagellm.engine.constraint import TokenConstraint
from sagellm.engine.llm_engine import LLMEngine
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams
from sagellm.testing.structured import OnlyToken

PROMPT = [5, 17, 42, 99, 123, 7, 250, 33, 8, 64, 11, 12, 13, 14, 15, 16, 200, 201, 202, 203,
          90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 3]
OTHER = [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]
ATOL = 2e-4


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(model=str(tiny_llama_dir), num_kv_blocks=96)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: Path) -> Callable[[list[int]], torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    log_probs.model = model  # type: ignore[attr-defined]
    return log_probs


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        constraints: dict[str, Callable[[], TokenConstraint]] | None = None,
        on_step: Callable[[LLMEngine], None] | None = None) -> dict[tuple[str, int], RequestOutput]:
    """Every request to the end; the final output per (request id, choice)."""
    constraints = constraints or {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(prompt, params, request_id=rid, constraint=constraints.get(rid))
    final: dict[tuple[str, int], RequestOutput] = {}
    streamed: dict[tuple[str, int], list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            key = (out.request_id, out.index)
            if out.new_logprobs is not None:
                streamed.setdefault(key, []).extend(out.new_logprobs)
            if out.finished:
                assert key not in final, "a choice finished twice"
                final[key] = out
        if on_step is not None:
            on_step(engine)
    for key, out in final.items():  # the deltas add up to the whole
        if out.logprobs is not None and out.error is None:
            assert streamed[key] == out.logprobs
    assert engine.block_manager.ref_counts == {} and engine._seqs == {}
    return final


# -- logprobs -------------------------------------------------------------------------------


def test_greedy_logprobs_are_the_reference_log_softmax(engine: LLMEngine, hf) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)
    out = run(engine, {"g": (PROMPT, params)})[("g", 0)]
    ref = hf(PROMPT + out.token_ids)
    assert out.logprobs is not None and len(out.logprobs) == 10
    for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(PROMPT) - 1 + j]
        assert lp.token_id == tok and lp.rank == 1
        assert lp.logprob == pytest.approx(row[tok].item(), abs=ATOL)
        top = row.topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, atol=ATOL, rtol=0)


def test_sampled_logprobs_sum_to_the_reference_log_likelihood(engine: LLMEngine, hf) -> None:
    # Penalties and temperature change what is sampled, not the distribution logprobs report.
    params = SamplingParams(temperature=1.3, top_k=60, seed=11, max_tokens=16, ignore_eos=True,
                            logprobs=0, presence_penalty=0.5, repetition_penalty=1.2)
    out = run(engine, {"s": (PROMPT, params)})[("s", 0)]
    ref = hf(PROMPT + out.token_ids)
    expected = sum(ref[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(out.token_ids))
    assert out.logprobs is not None and all(lp.top == () for lp in out.logprobs)
    assert sum(lp.logprob for lp in out.logprobs) == pytest.approx(expected, abs=1e-3)
    assert any(lp.rank > 1 for lp in out.logprobs)  # it sampled, so not every token is the argmax


def test_requests_without_logprobs_get_none(engine: LLMEngine) -> None:
    out = run(engine, {"plain": (OTHER, SamplingParams(temperature=0, max_tokens=3))})[("plain", 0)]
    assert out.logprobs is None and out.new_logprobs is None and out.prompt_logprobs is None


@pytest.mark.parametrize("caching", [False, True])
def test_prompt_logprobs_equal_the_reference_across_chunks(tiny_llama_dir: Path, hf,
                                                           caching: bool) -> None:
    # 16-token prefill chunks, and (with caching) the prompt's blocks already in the cache: every
    # position must still be computed.
    eng = LLMEngine(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4,
                    max_num_batched_tokens=16, max_prefill_tokens=16, enable_prefix_caching=caching)
    if caching:
        run(eng, {"warm": (PROMPT, SamplingParams(temperature=0, max_tokens=2))})
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)
    outs = run(eng, {"p": (PROMPT, params), "q": (OTHER, SamplingParams(max_tokens=3, seed=1))})
    out = outs[("p", 0)]
    ref = hf(PROMPT)
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(PROMPT) and lps[0] is None
    for q in range(1, len(PROMPT)):
        lp = lps[q]
        assert lp is not None and lp.token_id == PROMPT[q]
        assert lp.logprob == pytest.approx(ref[q - 1, PROMPT[q]].item(), abs=ATOL)
        assert lp.rank == int((ref[q - 1] > ref[q - 1, PROMPT[q]]).sum()) + 1
        assert [t for t, _ in lp.top] == ref[q - 1].topk(3).indices.tolist()
    assert outs[("q", 0)].prompt_logprobs is None
    if caching:
        assert eng.block_manager.num_cache_hits == 0  # the warm prefix was not used for "p"


# -- penalties and bias ---------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_greedy(engine: LLMEngine, hf) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5)
    out = run(engine, {"r": (PROMPT, params)})[("r", 0)]
    ids = torch.tensor([PROMPT])
    expected = hf.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, repetition_penalty=1.5, eos_token_id=None,
                                 pad_token_id=0)[0, len(PROMPT):].tolist()
    plain = run(engine, {"r0": (PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True))})[("r0", 0)]
    assert out.token_ids == expected
    assert out.token_ids != plain.token_ids  # the penalty changed something


def test_frequency_penalty_stops_a_forced_repeat(engine: LLMEngine) -> None:
    # A bias of +4 makes token 77 the greedy choice; a frequency penalty of 2 per occurrence
    # takes it back down after two of them.
    biased = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={77: 30.0})
    penalised = biased.model_copy(update={"frequency_penalty": 2.0, "logit_bias": {77: 4.0}})
    outs = run(engine, {"b": (PROMPT, biased), "f": (PROMPT, penalised)})
    assert outs[("b", 0)].token_ids == [77] * 8
    f = outs[("f", 0)].token_ids
    assert 0 < f.count(77) < 8


def test_logit_bias_forces_a_token_when_sampling(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, logit_bias={123: 100.0})
    assert run(engine, {"x": (OTHER, params)})[("x", 0)].token_ids == [123] * 6


def test_min_p_one_is_greedy(engine: LLMEngine) -> None:
    greedy = run(engine, {"g": (OTHER, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))})
    min_p = run(engine, {"m": (OTHER, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=6,
                                                     ignore_eos=True))})
    assert min_p[("m", 0)].token_ids == greedy[("g", 0)].token_ids


# -- n > 1 ----------------------------------------------------------------------------------


def test_n4_greedy_gives_identical_choices_sharing_the_prompt_blocks(engine: LLMEngine) -> None:
    shared: list[int] = []
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=4)
    outs = run(engine, {"n4": (PROMPT, params)},
               on_step=lambda e: shared.append(e.block_manager.num_shared_blocks))
    assert sorted(outs) == [("n4", i) for i in range(4)]
    assert len({tuple(o.token_ids) for o in outs.values()}) == 1
    alone = run(engine, {"one": (PROMPT, SamplingParams(temperature=0, max_tokens=8,
                                                        ignore_eos=True))})[("one", 0)]
    assert outs[("n4", 0)].token_ids == alone.token_ids
    # 40 prompt tokens in blocks of 16: the two full blocks before the last token are shared.
    assert max(shared) == (len(PROMPT) - 1) // engine.config.block_size == 2


def test_n4_seeded_is_reproducible_and_each_choice_is_seed_plus_index(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=10, ignore_eos=True, n=4)
    first = run(engine, {"a": (PROMPT, params)})
    second = run(engine, {"a": (PROMPT, params), "noise": (OTHER, SamplingParams(max_tokens=5))})
    tokens = [first[("a", i)].token_ids for i in range(4)]
    assert tokens == [second[("a", i)].token_ids for i in range(4)]
    assert len({tuple(t) for t in tokens}) > 1
    single = params.model_copy(update={"n": 1, "seed": 44})
    assert run(engine, {"c2": (PROMPT, single)})[("c2", 0)].token_ids == tokens[2]


def test_n_choices_in_llm_generate_are_grouped_by_prompt_then_index(engine: LLMEngine) -> None:
    llm = LLM.__new__(LLM)
    llm.engine = engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True, n=2)
    outs = llm.generate([PROMPT, OTHER], params, use_tqdm=False)
    assert [(o.prompt_token_ids == PROMPT, o.index) for o in outs] == [
        (True, 0), (True, 1), (False, 0), (False, 1)]
    assert outs[0].request_id == outs[1].request_id != outs[2].request_id


def test_abort_ends_every_choice(engine: LLMEngine) -> None:
    engine.add_request(PROMPT, SamplingParams(max_tokens=50, n=3), request_id="ab")
    engine.step()
    engine.step()  # choices forked and running
    assert engine.abort_request("ab")
    assert not engine.has_unfinished_requests() and engine._seqs == {}
    assert engine.block_manager.ref_counts == {}
    assert not engine.abort_request("ab")


def test_a_choice_id_that_is_taken_is_refused(engine: LLMEngine) -> None:
    engine.add_request(OTHER, SamplingParams(max_tokens=2), request_id="z/1")
    with pytest.raises(ValueError, match="z/1"):
        engine.add_request(OTHER, SamplingParams(max_tokens=2, n=2), request_id="z")
    engine.abort_request("z/1")


def test_a_failing_prefill_fails_all_its_unforked_choices_only(engine: LLMEngine) -> None:
    poison = 311

    def hook(module: torch.nn.Module, args: tuple) -> None:  # type: ignore[type-arg]
        if bool((args[0] == poison).any()):
            raise ValueError("poisoned batch")

    handle = engine.model.register_forward_pre_hook(hook)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        outs = run(engine, {"bad": ([poison, 5, 6], greedy.model_copy(update={"n": 3})),
                            "good": (OTHER, greedy)})
    finally:
        handle.remove()
    assert [outs[("bad", i)].finish_reason for i in range(3)] == ["error"] * 3
    assert all("poisoned" in (outs[("bad", i)].error or "") for i in range(3))
    assert outs[("good", 0)].error is None and len(outs[("good", 0)].token_ids) == 5


# -- token constraints ----------------------------------------------------------------------


class RejectsEverything:
    """Allows every token in the mask, then refuses whatever was chosen."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = -1

    def accept_token(self, token_id: int) -> bool:
        return False

    def is_terminated(self) -> bool:
        return False


def test_a_one_token_constraint_forces_it_and_stops_when_complete(engine: LLMEngine) -> None:
    made: list[OnlyToken] = []

    def factory() -> OnlyToken:
        made.append(OnlyToken(200, 3))
        return made[-1]

    assert isinstance(OnlyToken(1, 1), TokenConstraint)
    sampled = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, n=2, seed=5)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    outs = run(engine, {"s": (PROMPT, sampled), "g": (OTHER, greedy)},
               constraints={"s": factory, "g": lambda: OnlyToken(61, 2)})
    for key, n in ((("s", 0), 3), (("s", 1), 3), (("g", 0), 2)):
        assert outs[key].finish_reason == "stop" and len(outs[key].token_ids) == n
    assert set(outs[("s", 0)].token_ids + outs[("s", 1)].token_ids) == {200}
    assert outs[("g", 0)].token_ids == [61, 61]
    assert len(made) == 2  # one constraint per choice


def test_a_constraint_that_rejects_fails_only_its_request(engine: LLMEngine) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    clean = run(engine, {"ok": (OTHER, greedy)})[("ok", 0)].token_ids
    outs = run(engine, {"bad": (PROMPT, greedy), "ok": (OTHER, greedy)},
               constraints={"bad": RejectsEverything})
    assert outs[("bad", 0)].finish_reason == "error" and "not allowed" in outs[("bad", 0)].error
    assert outs[("bad", 0)].token_ids == []
    assert outs[("ok", 0)].token_ids == clean


def test_a_layout_that_cannot_fork_refuses_n_and_prompt_logprobs(tiny_llama_dir: Path) -> None:
    from sagellm.config import EngineConfig
    from sagellm.engine.layout import Layout
    from sagellm.prompt_validation import PromptError

    class NoForks(Layout):
        unsupported_params = frozenset({"n", "prompt_logprobs"})

    config = EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=16)
    eng = LLMEngine(config, layout=NoForks(config))
    for field, value in (("n", 2), ("prompt_logprobs", 0)):
        with pytest.raises(PromptError, match=field) as info:
            eng.add_request(OTHER, SamplingParams(**{field: value}))
        assert info.value.param == field
    assert not eng.has_unfinished_requests()
    out = run(eng, {"ok": (OTHER, SamplingParams(temperature=0, max_tokens=2, logprobs=1))})
    assert len(out[("ok", 0)].logprobs) == 2
