"""The prefill budget of a step that also decodes (``max_prefill_tokens_decoding``): prompts that
arrive beside running requests are prefilled in short chunks, each followed by the running
requests' next token; a step with nothing decoding keeps the whole prefill budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from sagellm.backends.cpu import CpuPlatform
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.config import EngineConfig
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import KVCacheSpec
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def scheduler(decoding: int | None) -> Scheduler:
    bm = BlockManager(TorchKVBackend(SPEC, 128, torch.device("cpu")), SPEC.block_size)
    return Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens=48,
                     max_prefill_tokens_decoding=decoding)


def seq(rid: str, n: int) -> SequenceState:
    return SequenceState(rid, list(range(1, n + 1)), SamplingParams(max_tokens=8))


def prefills(plan) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    return [(op.seq.request_id, op.start, op.end) for op in plan.prefills]


def test_prompts_beside_running_decodes_get_the_decoding_budget() -> None:
    sch = scheduler(decoding=16)
    a = seq("a", 40)
    sch.add(a)
    plan = sch.schedule()
    assert prefills(plan) == [("a", 0, 40)]  # nothing decodes: the whole prefill budget
    sch.commit(plan)
    a.append_token(7)
    sch.add(seq("b", 30))
    sch.add(seq("c", 30))
    plan = sch.schedule()
    assert [op.seq.request_id for op in plan.decodes] == ["a"]
    assert prefills(plan) == [("b", 0, 16)]  # one chunk of the decoding budget, beside a's token
    sch.commit(plan)
    a.append_token(8)
    plan = sch.schedule()
    assert prefills(plan) == [("b", 16, 30), ("c", 0, 2)] and len(plan.decodes) == 1


def test_a_held_request_counts_as_decoding() -> None:
    """With asynchronous scheduling a request whose token is on its way sits the step out
    (``hold``); the prompts of that step still get the short budget."""
    sch = scheduler(decoding=16)
    a = seq("a", 8)
    sch.add(a)
    sch.commit(sch.schedule())
    a.append_token(7)
    sch.add(seq("b", 30))
    plan = sch.schedule(hold=["a"])
    assert not plan.decodes and prefills(plan) == [("b", 0, 16)]


def test_without_a_decoding_budget_the_prefill_budget_applies() -> None:
    sch = scheduler(decoding=None)
    a = seq("a", 8)
    sch.add(a)
    sch.commit(sch.schedule())
    a.append_token(7)
    sch.add(seq("b", 60))
    plan = sch.schedule()
    assert len(plan.decodes) == 1 and prefills(plan) == [("b", 0, 48)]


def test_the_config_resolves_and_checks_the_budget() -> None:
    cfg = EngineConfig(model="m", max_num_batched_tokens=4096)
    assert cfg.max_prefill_tokens_decoding is None
    # Unset: the prefill budget (the backend's chunk, else the step budget).
    assert cfg.with_prefill_budget(2048).max_prefill_tokens_decoding == 2048
    assert cfg.with_prefill_budget(None).max_prefill_tokens_decoding == 4096
    # A value given stays, capped by a backend chunk below it.
    mine = EngineConfig(model="m", max_prefill_tokens_decoding=256)
    assert mine.with_prefill_budget(None).max_prefill_tokens_decoding == 256
    assert mine.with_prefill_budget(128).max_prefill_tokens_decoding == 128
    resolved = cfg.with_prefill_budget(1024)
    assert resolved.with_prefill_budget(64) is resolved  # already resolved: unchanged
    for bad in ({"max_prefill_tokens_decoding": 8},
                {"max_prefill_tokens_decoding": 9000},
                {"max_prefill_tokens": 1024, "max_prefill_tokens_decoding": 2048}):
        with pytest.raises(ValidationError, match="max_prefill_tokens_decoding"):
            EngineConfig(model="m", **bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-budget"), seed=5)


def test_the_engine_uses_the_budget_and_outputs_do_not_change(model_dir: Path) -> None:
    """Through the engine: unset, the prefill chunk applies to decoding steps too; a configured
    budget bounds the prefill of every step that decodes, and greedy outputs equal an engine's
    without it."""
    chunk = CpuPlatform.capabilities().prefill_chunk_tokens
    plain = LLMEngine(model=str(model_dir), num_kv_blocks=64)
    assert plain.scheduler.max_prefill_tokens_decoding == plain.config.max_prefill_tokens == chunk

    def run(engine: LLMEngine) -> tuple[dict[str, list[int]], int]:
        g = torch.Generator().manual_seed(1)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        engine.add_request(torch.randint(3, 256, (5,), generator=g).tolist(), params,
                           request_id="first")
        engine.step()
        for i in range(3):
            engine.add_request(torch.randint(3, 256, (40,), generator=g).tolist(), params,
                               request_id=f"late{i}")
        done: dict[str, list[int]] = {}
        most = 0
        schedule = engine.scheduler.schedule

        def watched(*a, **k):  # type: ignore[no-untyped-def]
            nonlocal most
            plan = schedule(*a, **k)
            if plan.decodes:
                most = max(most, plan.num_prefill_tokens)
            return plan

        engine.scheduler.schedule = watched  # type: ignore[method-assign]
        while engine.has_unfinished_requests():
            done.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
        return done, most

    want, most_plain = run(plain)
    short = LLMEngine(model=str(model_dir), num_kv_blocks=64, max_prefill_tokens_decoding=16)
    assert short.config.max_prefill_tokens_decoding == 16
    got, most_short = run(short)
    assert got == want
    assert most_short == 16 < most_plain
