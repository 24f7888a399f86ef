"""Asynchronous scheduling: step N+1 is planned and queued before step N's tokens are on the
host. Every output must equal the synchronous engine's, whatever ends a request (length, a stop
token or string, an abort, a failure, the context), through preemption, prefix-cache hits,
forks and chunked prefills; and no KV block may leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.engine.async_steps import use_async_scheduling
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch, patch_pending, pending_rows
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-async"), tokenizer=True)


def _engine(model: Path, asynchronous: bool, **kw: Any) -> LLMEngine:
    settings: dict[str, Any] = dict(model=str(model), dtype="float32", block_size=4,
                                    num_kv_blocks=96, max_num_seqs=8, max_model_len=128,
                                    max_num_batched_tokens=64, async_scheduling=asynchronous)
    settings.update(kw)
    return LLMEngine(**settings)


def _prompts(*lens: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + sum(lens))
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


def _run(engine: LLMEngine, prompts: list[list[int]] | list[str],
         params: SamplingParams | list[SamplingParams], arrive_every: int = 0,
         abort: dict[int, str] | None = None) -> dict[str, RequestOutput]:
    """Every request to its end: all at once, or one joining every ``arrive_every`` steps;
    ``abort``: step number -> request id aborted before that step. Returns each request's
    last output by request id (an aborted one: its last output before the abort) and checks
    the stream of outputs: token ids only grow, no placeholder, one final output."""
    per = params if isinstance(params, list) else [params] * len(prompts)
    waiting = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, per))]
    if not arrive_every:
        for rid, p, sp in waiting:
            engine.add_request(p, sp, request_id=rid)
        waiting = []
    last: dict[str, RequestOutput] = {}
    finished: set[str] = set()
    steps = 0
    while waiting or engine.has_unfinished_requests():
        if waiting and steps % max(arrive_every, 1) == 0:
            rid, p, sp = waiting.pop(0)
            engine.add_request(p, sp, request_id=rid)
        if abort and steps in abort:
            assert engine.abort_request(abort[steps])
        steps += 1
        for out in engine.step():
            key = out.request_id if out.index == 0 else f"{out.request_id}/{out.index}"
            assert key not in finished, f"{key} gave an output after its last"
            prev = last.get(key)
            if prev is not None:
                assert out.token_ids[:len(prev.token_ids)] == prev.token_ids
            assert PENDING_TOKEN not in out.token_ids
            last[key] = out
            if out.finished:
                finished.add(key)
        assert steps < 2000, "the engine does not finish"
    return last


def _ids(outs: dict[str, RequestOutput]) -> dict[str, list[int]]:
    return {k: list(o.token_ids) for k, o in outs.items()}


def _pool_returned(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.reset_prefix_cache()
    assert bm.ref_counts == {} and engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine._seqs == {} and not engine.has_unfinished_requests()
    # A step queued for requests that all ended while it ran is waited for (and dropped) by
    # the next step() call.
    assert engine.step() == [] and (engine.pipeline is None or engine.pipeline.inflight is None)


def _both(model: Path, prompts, params, **kw: Any) -> tuple[dict, dict, LLMEngine]:  # type: ignore[no-untyped-def]
    run_kw = {k: kw.pop(k) for k in ("arrive_every", "abort") if k in kw}
    sync = _run(_engine(model, False, **kw), prompts, params, **run_kw)
    engine = _engine(model, True, **kw)
    assert engine.async_scheduling
    got = _run(engine, prompts, params, **run_kw)
    _pool_returned(engine)
    return sync, got, engine


def test_greedy_staggered_with_chunked_prefills_equals_sync(tiny: Path) -> None:
    prompts = _prompts(5, 40, 9, 100, 17, 3, seed=1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sync, got, engine = _both(tiny, prompts, params, arrive_every=3, max_prefill_tokens=32)
    assert _ids(got) == _ids(sync)
    assert all(len(o.token_ids) == 12 for o in got.values())
    assert engine.num_generation_tokens == 12 * len(prompts)


def test_every_step_after_the_first_is_queued_before_the_previous_is_waited_for(
        tiny: Path) -> None:
    """The timeline itself: a step's launch comes before the wait of the one before it, with a
    grammar request and a penalised one in the batch too."""
    engine = _engine(tiny, True)
    events: list[tuple[str, int]] = []
    launch = engine.runner.launch

    def recording(plan, prev=None):  # type: ignore[no-untyped-def]
        events.append(("launch", plan.step_id))
        out = launch(plan, prev)
        wait = out._wait

        def waited() -> list[int]:
            events.append(("wait", plan.step_id))
            return wait()

        out._wait = waited
        return out

    engine.runner.launch = recording  # type: ignore[method-assign]
    from sagellm.structured.params import StructuredOutputParams

    _run(engine, _prompts(6, 8, 7), [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                       structured_output=StructuredOutputParams(regex="[a-z]{6}")),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, frequency_penalty=0.5)])
    launches = [s for kind, s in events if kind == "launch"]
    waits = [s for kind, s in events if kind == "wait"]
    assert launches == waits == sorted(launches)
    for step in launches[1:]:
        assert events.index(("launch", step)) < events.index(("wait", step - 1))


def test_max_tokens_holds_the_request_out_of_the_next_step(tiny: Path) -> None:
    """A request whose coming token ends it by length is not computed again: it is decoded
    exactly ``max_tokens - 1`` times, as synchronously."""
    engine = _engine(tiny, True)
    decodes: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def counting(hold=()):  # type: ignore[no-untyped-def]
        plan = schedule(hold)
        for op in plan.decodes:
            decodes[op.seq.request_id] = decodes.get(op.seq.request_id, 0) + 1
        return plan

    engine.scheduler.schedule = counting  # type: ignore[method-assign]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 7)]
    got = _run(engine, _prompts(4, 6, 8), params)
    assert [len(got[f"r{i}"].token_ids) for i in range(3)] == [1, 2, 7]
    assert decodes.get("r0", 0) == 0 and decodes["r1"] == 1 and decodes["r2"] == 6
    _pool_returned(engine)


def test_the_context_end_holds_the_request_too(tiny: Path) -> None:
    prompts = _prompts(60, 30)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    sync, got, _ = _both(tiny, prompts, params, max_model_len=64)
    assert _ids(got) == _ids(sync)
    r0 = got["r0"]
    assert len(r0.prompt_token_ids) + len(r0.token_ids) == 64 and r0.finish_reason == "length"


def test_stop_tokens_and_strings_drop_the_token_computed_after_them(tiny: Path) -> None:
    """Ended by a stop token, a stop string or EOS the step after is already queued: its token
    is dropped, the text and finish reasons equal the synchronous run's."""
    sync_engine = _engine(tiny, False)
    free = _run(sync_engine, ["hello there", "abc"],
                SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    ids = free["r0"].token_ids
    text = free["r1"].text
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ids[4]]),
              SamplingParams(temperature=0, max_tokens=16, stop=[text[3:6]]),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[text[3:6]],
                             include_stop_str_in_output=True)]
    sync, got, _ = _both(tiny, ["hello there", "abc", "abc"], params)
    for k in sync:
        assert got[k].token_ids == sync[k].token_ids
        assert got[k].text == sync[k].text
        assert got[k].finish_reason == sync[k].finish_reason == "stop"
        assert got[k].stop_reason == sync[k].stop_reason


def test_eos_ends_a_request_with_its_next_step_in_flight(tiny: Path) -> None:
    engine = _engine(tiny, False)
    free = _run(engine, _prompts(7, 12), SamplingParams(temperature=0, max_tokens=10,
                                                        ignore_eos=True))
    eos_at = free["r0"].token_ids[3]
    model_eos = frozenset({eos_at})
    sync_engine, async_engine = _engine(tiny, False), _engine(tiny, True)
    for e in (sync_engine, async_engine):
        e.eos_token_ids = model_eos
    params = SamplingParams(temperature=0, max_tokens=10)
    sync = _run(sync_engine, _prompts(7, 12), params)
    got = _run(async_engine, _prompts(7, 12), params)
    assert _ids(got) == _ids(sync)
    assert got["r0"].finish_reason == "stop"
    _pool_returned(async_engine)


def test_seeded_sampling_logprobs_and_choices_equal_sync(tiny: Path) -> None:
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=3, n=3, max_tokens=6,
                             ignore_eos=True),
              SamplingParams(temperature=0, logprobs=3, max_tokens=8, ignore_eos=True,
                             prompt_logprobs=2),
              SamplingParams(temperature=0, min_tokens=5, max_tokens=8, logit_bias={9: 5.0})]
    prompts = _prompts(11, 6, 9, 5, seed=4)
    sync, got, _ = _both(tiny, prompts, params, arrive_every=2)
    assert set(got) == set(sync)
    for k in sync:
        assert got[k].token_ids == sync[k].token_ids, k
    # Batches are composed differently (the pipeline admits requests a step apart), so the
    # logprobs may differ in the last float bits.
    for a, b in [*zip(got["r2"].logprobs, sync["r2"].logprobs, strict=True),
                 *zip(got["r2"].prompt_logprobs[1:], sync["r2"].prompt_logprobs[1:],
                      strict=True)]:
        assert a.token_id == b.token_id and a.rank == b.rank
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_penalties_and_grammars_equal_sync(tiny: Path) -> None:
    """Penalised rows count their pending token from the device, grammar rows get it accepted
    by the mask-fill worker; every request comes out as without asynchronous scheduling."""
    from sagellm.structured.params import StructuredOutputParams

    params = [SamplingParams(temperature=0, max_tokens=10, presence_penalty=1.5,
                             repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10,
                             structured_output=StructuredOutputParams(regex="[a-c]{3,6}"))]
    prompts = ["one", "two", "three"]
    sync, got, _ = _both(tiny, prompts, params, arrive_every=1)
    assert _ids(got) == _ids(sync)
    assert all(c in "abc" for c in got["r2"].text)


def _add_constrained(engine: LLMEngine, factories: list[Any], max_tokens: int = 12
                     ) -> dict[str, RequestOutput]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, factory in enumerate(factories):
        engine.add_request(_prompts(5 + i)[0], params, request_id=f"g{i}", constraint=factory)
    engine.add_request(_prompts(7)[0], params, request_id="free")
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_a_grammar_that_changes_every_step_sees_each_token_before_its_next_mask(
        tiny: Path) -> None:
    """``Scripted`` allows one token per step, a different one each time, and refuses a mask
    filled before its previous token was accepted: with steps queued ahead it still gets
    exactly its script, while the graphs' greedy row beside it is unchanged."""
    from sagellm.testing.structured import Scripted

    scripts = [[40, 41, 42, 43, 44, 45, 46, 47], [9, 99, 9, 99, 9]]
    engine = _engine(tiny, True)
    got = _add_constrained(engine, [lambda s=s: Scripted(s) for s in scripts])
    want = _add_constrained(_engine(tiny, False), [lambda s=s: Scripted(s) for s in scripts])
    for i, script in enumerate(scripts):
        assert got[f"g{i}"].token_ids == script and got[f"g{i}"].finish_reason == "stop"
    assert got["free"].token_ids == want["free"].token_ids
    _pool_returned(engine)


class _RefusesAt:
    """Allows every token, refuses the ``k``-th it is offered."""

    def __init__(self, k: int) -> None:
        self.k, self.accepted = k, 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = -1

    def accept_token(self, token_id: int) -> bool:
        self.accepted += 1
        return self.accepted != self.k

    def is_terminated(self) -> bool:
        return False


def test_a_token_the_grammar_refuses_on_the_mask_fill_worker_fails_only_its_request(
        tiny: Path) -> None:
    engine = _engine(tiny, True)
    got = _add_constrained(engine, [lambda: _RefusesAt(4)])
    want = _add_constrained(_engine(tiny, False), [lambda: _RefusesAt(4)])
    for final in (got, want):
        assert final["g0"].finish_reason == "error" and "not allowed" in (final["g0"].error or "")
        assert len(final["g0"].token_ids) == 3  # the refused 4th never comes out
    assert got["g0"].token_ids == want["g0"].token_ids
    assert got["free"].token_ids == want["free"].token_ids and got["free"].error is None
    _pool_returned(engine)


def test_abort_with_a_step_in_flight(tiny: Path) -> None:
    """An abort between steps, while the aborted request's next token is being computed: the
    others are unaffected, its blocks come back, its token never comes out."""
    prompts = _prompts(8, 9, 10, 11)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    sync, got, engine = _both(tiny, prompts, params, abort={5: "r1", 9: "r3"})
    assert _ids(got) == _ids(sync)
    assert not got["r1"].finished and not got["r3"].finished
    assert got["r0"].finished and got["r2"].finished


def test_a_new_request_may_reuse_an_aborted_requests_id_at_once(tiny: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    alone = _run(_engine(tiny, False), [_prompts(9)[0]], params)["r0"]
    engine2 = _engine(tiny, True)
    engine2.add_request(_prompts(6)[0], params, request_id="x")
    engine2.step()
    engine2.step()
    assert engine2.pipeline is not None and engine2.pipeline.inflight is not None  # "x" has its next step in flight
    assert engine2.abort_request("x")
    engine2.add_request(_prompts(9)[0], params, request_id="x")
    last = None
    while engine2.has_unfinished_requests():
        for out in engine2.step():
            assert out.request_id == "x"
            last = out
    assert last is not None and last.token_ids == alone.token_ids
    _pool_returned(engine2)


def test_preemption_prefix_hits_and_forks_equal_sync(tiny: Path) -> None:
    """A pool too small for all: sequences are preempted while their token is on its way and
    recomputed (their pending token taken from the device), prefixes hit the cache, ``n=2``
    forks."""
    base = _prompts(13)[0]
    prompts = [base + [5, 6], base + [7], _prompts(9)[0], base[:8] + [9, 9, 9], _prompts(21)[0]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, n=n)
              for m, n in ((30, 1), (24, 2), (34, 1), (20, 1), (28, 1))]
    sync, got, engine = _both(tiny, prompts, params, num_kv_blocks=24)
    assert _ids(got) == _ids(sync)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_cache_hits > 0


def test_a_request_preempted_while_its_ending_token_is_on_its_way_leaves_the_queue(
        tiny: Path) -> None:
    """Before every step the newest running request is preempted and kept waiting for that
    step, while its token is still pending; requests end on stop tokens taken from a free run
    or by length, some of them while waiting. Each ends once, nothing finished stays queued,
    outputs equal sync."""
    free = _run(_engine(tiny, False), _prompts(6, 9, 12, 7),
                SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    params = [SamplingParams(temperature=0, max_tokens=m, stop_token_ids=[o.token_ids[k]])
              for o, k, m in zip(free.values(), (3, 5, 2, 7), (12, 4, 12, 6))]

    def preempting(engine: LLMEngine) -> LLMEngine:
        sched = engine.scheduler
        schedule = sched.schedule

        def wrapped(hold=()):  # type: ignore[no-untyped-def]
            # Held ones too (the scheduler itself never preempts those): their token ends them.
            victim = next((s for s in reversed(sched.running) if s.request_id in hold),
                          sched.running[-1] if sched.running else None)
            limit = sched.max_num_seqs
            if victim is not None and len(sched.running) > 1:
                sched._preempt(victim, StepPlan(step_id=0))
                sched.max_num_seqs = len(sched.running)  # it waits out this step
            try:
                plan = schedule(hold)
            finally:
                sched.max_num_seqs = limit
            assert not any(s.status.finished for s in sched.waiting)
            return plan

        sched.schedule = wrapped  # type: ignore[method-assign]
        return engine

    from sagellm.engine.plan import StepPlan

    engine = preempting(_engine(tiny, True))
    got = _run(engine, _prompts(6, 9, 12, 7), params)
    want = _run(preempting(_engine(tiny, False)), _prompts(6, 9, 12, 7), params)
    assert _ids(got) == _ids(want)
    assert engine.scheduler.num_preemptions > 0 and not engine.scheduler.waiting
    _pool_returned(engine)


@pytest.mark.parametrize("arrive_every", [0, 2])
def test_a_step_that_raises_while_queued_fails_only_its_request(tiny: Path,
                                                                arrive_every: int) -> None:
    """Queueing a step raises (here: a forward that sees the poisoned prompt): the step runs
    again synchronously, one request at a time, the first step (nothing in flight) or one
    queued behind another; only the poisoned request fails."""
    poison = 251
    prompts = [[5, 6, 7, 8], [poison, 3, 4], [9, 10, 11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = _run(_engine(tiny, False), [prompts[0], prompts[2]], params)
    engine = _engine(tiny, True)

    def hook(module: torch.nn.Module, args: tuple) -> None:  # type: ignore[type-arg]
        if bool((args[0] == poison).any()):
            raise ValueError("poisoned batch")

    engine.model.register_forward_pre_hook(hook)
    got = _run(engine, prompts, params, arrive_every=arrive_every)
    assert got["r1"].finished and got["r1"].finish_reason == "error"
    assert "poisoned batch" in (got["r1"].error or "")
    assert got["r0"].token_ids == want["r0"].token_ids
    assert got["r2"].token_ids == want["r1"].token_ids
    _pool_returned(engine)


def test_a_step_that_fails_on_the_device_fails_its_requests_and_the_engine_goes_on(
        tiny: Path) -> None:
    """The wait for a queued step raises (a non-fatal device error): that step's requests
    fail, later requests run."""
    engine = _engine(tiny, True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    launch = engine.runner.launch
    failures = [3]

    def failing(plan, prev=None):  # type: ignore[no-untyped-def]
        out = launch(plan, prev)
        if plan.step_id in failures:
            def broken() -> list[int]:
                raise RuntimeError("device fault")
            out._wait = broken
        return out

    engine.runner.launch = failing  # type: ignore[method-assign]
    got = _run(engine, _prompts(5, 7), params)
    assert {o.finish_reason for o in got.values()} == {"error"}
    failures.clear()
    again = _run(engine, _prompts(5, 7), params)
    want = _run(_engine(tiny, False), _prompts(5, 7), params)
    assert _ids(again) == _ids(want)
    _pool_returned(engine)


def test_auto_is_off_on_the_cpu_and_a_multi_rank_runner_stays_synchronous(
        tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not _engine(tiny, None).async_scheduling  # type: ignore[arg-type]
    engine = _engine(tiny, True)
    assert engine.async_scheduling

    class Synchronous(type(engine.runner)):  # type: ignore[misc]
        def execute(self, plan):  # type: ignore[no-untyped-def]
            return super().execute(plan)

    engine.runner.__class__ = Synchronous
    with caplog.at_level("WARNING", logger="sagellm.engine"):
        assert not use_async_scheduling(engine)
    assert "runs each step synchronously" in caplog.text


# -- the placeholder patch -------------------------------------------------------------------


def test_core_runner_takes_pending_inputs_of_prefills_and_decodes_from_the_step_before(
        tiny: Path) -> None:
    """A prompt recomputed whole while its last token is pending, next to a decode whose
    token is pending: both inputs come from the previous launch's ids."""
    from sagellm.engine.plan import DecodeOp, PrefillOp, StepPlan

    engine = _engine(tiny, False)
    runner, bm = engine.runner, engine.block_manager
    prompt, ctx = _prompts(10, 6)
    params = SamplingParams(temperature=0)

    def plan_for(tokens: list[int], last: int) -> tuple[StepPlan, SequenceState, SequenceState]:
        p = SequenceState("p", tokens, params)
        bm.allocate(p, len(tokens))
        d = SequenceState("d", ctx + [last], params)
        bm.allocate(d, len(ctx))
        d.num_computed_tokens = len(ctx)
        bm.allocate(d, 1)
        return StepPlan(1, prefills=[PrefillOp(p, 0, len(tokens))], decodes=[DecodeOp(d)]), p, d

    # The decode's context KV: computed once, shared by both runs (same blocks each time).
    plan, p, d = plan_for(prompt, 9)
    runner.execute(StepPlan(0, prefills=[PrefillOp(d, 0, len(ctx))]))
    want = runner.execute(plan)
    plan2, p2, d2 = plan_for(prompt[:-1] + [PENDING_TOKEN], PENDING_TOKEN)
    d2.block_table = list(d.block_table)
    runner.execute(StepPlan(0, prefills=[PrefillOp(d2, 0, len(ctx))]))
    prev = StepLaunch([d2, p2], torch.tensor([9, prompt[-1]]), lambda: [9, prompt[-1]])
    assert runner.launch(plan2, prev).result() == want


def _seq(rid: str) -> SequenceState:
    return SequenceState(rid, [1, 2, PENDING_TOKEN], SamplingParams())


def test_patch_pending_copies_the_previous_steps_ids_in_any_order() -> None:
    a, b, c = _seq("a"), _seq("b"), _seq("c")
    prev = StepLaunch([a, b, c], torch.tensor([40, 50, 60]), lambda: [40, 50, 60])
    ids = torch.tensor([7, PENDING_TOKEN, PENDING_TOKEN, PENDING_TOKEN], dtype=torch.int32)
    patch_pending(ids, [1, 2, 3], [a, b, c], prev)  # the steady batch: one slice copy
    assert ids.tolist() == [7, 40, 50, 60]
    ids = torch.tensor([PENDING_TOKEN, 8, PENDING_TOKEN], dtype=torch.int64)
    patch_pending(ids, [0, 2], [c, a], prev)
    assert ids.tolist() == [60, 8, 40]
    assert pending_rows([1, PENDING_TOKEN, 3, PENDING_TOKEN]) == [1, 3]
    patch_pending(ids, [], [], None)  # nothing pending: nothing needed


def test_patch_pending_refuses_a_token_the_previous_step_did_not_sample() -> None:
    a, b = _seq("a"), _seq("b")
    prev = StepLaunch([a], torch.tensor([40]), lambda: [40])
    ids = torch.tensor([PENDING_TOKEN])
    with pytest.raises(RuntimeError, match="was not sampled by the queued step"):
        patch_pending(ids, [0], [b], prev)
    with pytest.raises(RuntimeError, match="no queued step sampled it"):
        patch_pending(ids, [0], [a], None)
    with pytest.raises(RuntimeError, match="no queued step sampled it"):
        patch_pending(ids, [0], [a], StepLaunch.done([a], [40]))


def test_step_launch_waits_once() -> None:
    calls = []

    def wait() -> list[int]:
        calls.append(1)
        return [3]

    launch = StepLaunch([_seq("a")], torch.tensor([3]), wait)
    assert launch.result() == [3] and launch.result() == [3] and calls == [1]
    assert StepLaunch.done([], []).result() == []
