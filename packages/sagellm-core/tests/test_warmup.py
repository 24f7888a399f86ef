"""The start-up warm-up (``sagellm.engine.warmup``): it makes every kind of step that traffic
makes run once (a burst of prompts, prompts joining decodes, a cached prefix, sampling,
penalties, logprobs, ``n > 1``, grammars), leaves nothing behind (requests, KV blocks, cached
prefixes, counters), never changes what the engine answers afterwards, and never keeps the
engine from serving when it fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagellm.engine import warmup as warmup_mod
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.plan import StepPlan
from sagellm.engine.scheduler import Scheduler
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-warmup"), tokenizer=True)


def _engine(model: Path, **kw: Any) -> LLMEngine:
    settings: dict[str, Any] = dict(model=str(model), dtype="float32", block_size=4,
                                    num_kv_blocks=2048, max_num_seqs=16, max_model_len=256,
                                    max_num_batched_tokens=2048, max_prefill_tokens=2048,
                                    async_scheduling=False)
    settings.update(kw)
    return LLMEngine(**settings)


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[StepPlan]:
    """Every plan any scheduler makes during the test (the warm-up's included)."""
    seen: list[StepPlan] = []
    original = Scheduler.schedule

    def spy(self: Scheduler, hold: Any = ()) -> StepPlan:
        plan = original(self, hold)
        if not plan.is_empty:
            seen.append(plan)
        return plan

    monkeypatch.setattr(Scheduler, "schedule", spy)
    return seen


def _greedy(engine: LLMEngine, prompts: list[list[int]], n: int = 6) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                           request_id=f"q{i}")
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[f"q{i}"] for i in range(len(prompts))]


def _assert_no_trace(engine: LLMEngine) -> None:
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert engine.block_manager.num_cached_blocks == 0
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (0, 0)
    assert (stats.num_prefix_cache_queries, stats.num_prefix_cache_hits) == (0, 0)
    assert (stats.num_kv_evictions, stats.num_preemptions) == (0, 0)
    assert not engine._seqs and not engine._groups and not engine._compiling
    assert engine.pipeline is None or engine.pipeline.inflight is None


@pytest.mark.parametrize("asynchronous", [False, True])
def test_warmup_runs_every_kind_of_step_and_leaves_no_trace(tiny: Path, plans: list[StepPlan],
                                                            asynchronous: bool) -> None:
    engine = _engine(tiny, warmup=True, async_scheduling=asynchronous)
    report = engine.warmup
    assert report is not None and report.error is None, report
    assert set(report.requests) == {"plain", "sampling", "grammar"}
    assert report.steps >= len(plans) > 0
    ops = [(plan, [op.seq for op in plan.prefills], [op.seq for op in plan.decodes])
           for plan in plans]
    # A burst: one step prefilling the whole first batch, and decodes of 16 rows and of fewer.
    assert max(len(p) for _, p, _ in ops) == warmup_mod.MAX_BATCH
    assert warmup_mod.MAX_BATCH in {len(d) for _, _, d in ops}
    assert {1, 2, 3} & {len(d) for _, _, d in ops}
    # Prompts joining running decodes, one over the cached prefix of an earlier prompt.
    assert any(p and d for _, p, d in ops)
    assert any(op.start > 0 for plan, _, _ in ops for op in plan.prefills)
    seqs = {s.request_id: s for _, p, d in ops for s in p + d}
    assert all(rid.startswith(warmup_mod.REQUEST_PREFIX) for rid in seqs)
    params = [s.params for s in seqs.values()]
    assert any(sp.temperature > 0 and sp.seed is not None for sp in params)
    assert any(sp.repetition_penalty != 1.0 and sp.presence_penalty for sp in params)
    assert any(sp.logprobs == 5 for sp in params) and any(sp.prompt_logprobs for sp in params)
    assert any(sp.logit_bias and sp.min_p for sp in params) and any(sp.n == 2 for sp in params)
    kinds = {sp.structured_output.model_dump(exclude_defaults=True).keys().__iter__().__next__()
             for sp in params if sp.structured_output is not None}
    assert kinds == {"json_schema", "regex"}
    # Each feature also alone in a batch: a decode step whose every row samples with penalties.
    assert any(d and all(s.params.presence_penalty for s in d) for _, _, d in ops)
    _assert_no_trace(engine)


def test_answers_after_warmup_equal_a_cold_engine(tiny: Path) -> None:
    prompts = [[5 + i, 17, 33 + 2 * i, 9, 120 - i] * (i + 1) for i in range(5)]
    cold = _greedy(_engine(tiny, warmup=False), prompts)
    warm = _engine(tiny, warmup=True)
    assert warm.warmup is not None and warm.warmup.error is None
    assert _greedy(warm, prompts) == cold
    # The warm engine's counters start from its own first request.
    assert warm.get_stats().num_prompt_tokens == sum(map(len, prompts))


def test_warmup_default_follows_the_platform(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(tiny)  # auto, on the CPU backend: nothing compiles on first use
    assert engine.config.warmup is None and engine.warmup is None
    assert warmup_mod.use_warmup(engine) is False
    caps = engine.platform.capabilities()
    monkeypatch.setattr(type(engine.platform), "capabilities",
                        lambda self: type(caps)(**{**caps.__dict__, "compiles_on_first_use": True}))
    assert warmup_mod.use_warmup(engine) is True
    engine.config = engine.config.model_copy(update={"warmup": False})
    assert warmup_mod.use_warmup(engine) is False


def test_warmup_fits_small_engines(tiny: Path) -> None:
    """One sequence at a time, a short context and a small step budget: the waves shrink to fit
    (chunked prompts, one row per step) and still finish."""
    engine = _engine(tiny, warmup=True, max_num_seqs=1, max_model_len=24,
                     max_num_batched_tokens=16, max_prefill_tokens=16,
                     num_kv_blocks=16)
    assert engine.warmup is not None and engine.warmup.error is None, engine.warmup
    assert engine.warmup.num_requests > 0
    _assert_no_trace(engine)
    assert len(_greedy(engine, [[4, 5, 6]], n=3)[0]) == 3


def test_prompt_lengths_respect_the_context_and_the_budget() -> None:
    lengths = warmup_mod.prompt_lengths(16, 4096, 8192)
    assert len(lengths) == 16 and len(set(lengths)) > 8
    assert any(n % 16 == 0 for n in lengths) and any(n % 2 for n in lengths)
    assert max(warmup_mod.prompt_lengths(16, 40, 8192)) == 40
    squeezed = warmup_mod.prompt_lengths(16, 4096, 200)
    assert len(squeezed) == 16 and sum(squeezed) <= 200 and min(squeezed) >= 2
    assert len(warmup_mod.prompt_lengths(16, 4096, 33)) == 16
    assert warmup_mod.prompt_lengths(16, 4096, 8) == [2, 2, 2, 2]
    assert warmup_mod.prompt_lengths(4, 4096, 1) == []


def test_a_failing_warmup_is_reported_and_the_engine_serves(tiny: Path, plans: list[StepPlan],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    original = warmup_mod._Waves.sampling

    def broken(self: warmup_mod._Waves) -> None:
        self.add("sampling", self.prompt(9), self.params())  # queued, then the wave breaks
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(warmup_mod._Waves, "sampling", broken)
    engine = _engine(tiny, warmup=True, async_scheduling=True)
    report = engine.warmup
    assert report is not None and report.error == "RuntimeError: kernel exploded"
    assert report.requests["plain"] > 0 and "grammar" not in report.requests
    _assert_no_trace(engine)
    monkeypatch.setattr(warmup_mod._Waves, "sampling", original)
    assert len(_greedy(engine, [[7, 8, 9, 10]])[0]) == 6


def test_a_failed_warmup_request_stops_the_warmup(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that the engine fails (its step raised) ends the warm-up with that error."""
    def fail_logprobs(self: Any, plan: StepPlan, *a: Any, **kw: Any) -> Any:
        if any(op.seq.params.logprobs for op in (*plan.prefills, *plan.decodes)):
            raise ValueError("no logprobs today")
        return launch(self, plan, *a, **kw)

    from sagellm.engine.model_runner import ModelRunner

    launch = ModelRunner.launch
    monkeypatch.setattr(ModelRunner, "launch", fail_logprobs)
    engine = _engine(tiny, warmup=True)
    report = engine.warmup
    assert report is not None and report.error is not None
    assert "no logprobs today" in report.error
    _assert_no_trace(engine)


def test_a_fatal_error_in_the_warmup_propagates(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class DeviceLost(RuntimeError):
        pass

    def lost(self: warmup_mod._Waves) -> None:
        raise DeviceLost("gone")

    from sagellm.backends.cpu import CpuPlatform

    monkeypatch.setattr(warmup_mod._Waves, "plain", lost)
    monkeypatch.setattr(CpuPlatform, "is_fatal_error", lambda self, exc: isinstance(exc, DeviceLost))
    with pytest.raises(DeviceLost):
        _engine(tiny, warmup=True)


def test_a_model_without_tokenizer_skips_the_grammar_wave(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, warmup=True)
    assert engine.tokenizer is None
    assert engine.warmup is not None and engine.warmup.error is None
    assert "grammar" not in engine.warmup.requests and engine.warmup.requests["sampling"] > 0
    _assert_no_trace(engine)
