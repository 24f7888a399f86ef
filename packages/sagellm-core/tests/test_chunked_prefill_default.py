"""Long prompts are prefilled in chunks by default, so they never hold up running requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.engine.layout import Layout
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.plan import StepPlan
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama

CHUNK = CpuPlatform.capabilities().prefill_chunk_tokens
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LONG = 1000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-long"), seed=3, max_position_embeddings=2048)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def recording(engine: LLMEngine) -> list[StepPlan]:
    """Record every plan the engine's scheduler makes."""
    plans: list[StepPlan] = []
    schedule = engine.scheduler.schedule

    def record() -> StepPlan:
        plan = schedule()
        plans.append(plan)
        return plan

    engine.scheduler.schedule = record  # type: ignore[method-assign]
    return plans


def test_cpu_engines_chunk_prefill_by_default(model_dir: Path) -> None:
    assert CHUNK is not None and 16 <= CHUNK < 8192
    eng = LLMEngine(model=str(model_dir), num_kv_blocks=8)
    assert eng.config.max_prefill_tokens == eng.scheduler.max_prefill_tokens == CHUNK
    # An explicit budget wins, and the step budget caps the platform's default.
    assert LLMEngine(model=str(model_dir), num_kv_blocks=8,
                     max_prefill_tokens=512).scheduler.max_prefill_tokens == 512
    assert LLMEngine(model=str(model_dir), num_kv_blocks=8,
                     max_num_batched_tokens=64).scheduler.max_prefill_tokens == 64
    # A layout passed in with an unresolved config gets the backend's default too.
    config = EngineConfig(model=str(model_dir), num_kv_blocks=8)
    assert config.max_prefill_tokens is None
    eng = LLMEngine(config, layout=Layout(config))
    assert eng.config.max_prefill_tokens == eng.scheduler.max_prefill_tokens == CHUNK


def test_a_long_prompt_interleaves_with_running_decodes(model_dir: Path) -> None:
    short_p, long_p = prompt(12, 1), prompt(LONG, 2)
    whole = LLMEngine(model=str(model_dir), num_kv_blocks=200, max_num_batched_tokens=2048,
                      max_prefill_tokens=2048)
    expected = {}
    for name, p in (("short", short_p), ("long", long_p)):
        whole.add_request(p, GREEDY, request_id=name)
        while whole.has_unfinished_requests():
            expected.update({o.request_id: o.token_ids for o in whole.step() if o.finished})

    eng = LLMEngine(model=str(model_dir), num_kv_blocks=200)
    plans = recording(eng)
    eng.add_request(short_p, GREEDY, request_id="short")
    eng.step()  # the short request is now decoding
    eng.add_request(long_p, GREEDY, request_id="long")
    per_step: list[list[RequestOutput]] = []
    final: dict[str, RequestOutput] = {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        per_step.append(outs)
        final.update({o.request_id: o for o in outs if o.finished})

    num_chunks = -(-LONG // CHUNK)
    chunk_plans = plans[1:1 + num_chunks]
    for i, plan in enumerate(chunk_plans):
        (op,) = plan.prefills
        assert op.seq.request_id == "long" and op.start == i * CHUNK
        assert op.num_tokens == min(CHUNK, LONG - i * CHUNK)
        assert [d.seq.request_id for d in plan.decodes] == ["short"]
    # The short request got a token in every step the long prompt was being prefilled.
    for outs in per_step[:num_chunks]:
        assert "short" in {o.request_id for o in outs if o.new_token_ids}
    assert not any(o.request_id == "long" for outs in per_step[:num_chunks - 1] for o in outs)
    assert final["short"].token_ids == expected["short"]
    assert final["long"].token_ids == expected["long"]
    assert eng.block_manager.ref_counts == {}


def test_abort_mid_prefill_drops_the_request_and_frees_its_blocks(model_dir: Path) -> None:
    eng = LLMEngine(model=str(model_dir), num_kv_blocks=200, enable_prefix_caching=False)
    plans = recording(eng)
    rid = eng.add_request(prompt(LONG, 4), GREEDY)
    other = eng.add_request(prompt(20, 5), GREEDY)
    eng.step()
    seq = eng._seqs[rid]
    assert seq.num_computed_tokens == CHUNK < LONG  # mid-prefill
    assert eng.block_manager.num_free_blocks < eng.kv.num_blocks
    assert eng.abort_request(rid)
    # The other request waited behind the long prompt's chunk; it holds no blocks yet.
    assert eng._seqs[other].block_table == []
    assert eng.block_manager.num_free_blocks == eng.kv.num_blocks
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert all(o.request_id == other for o in outs)
    assert all(op.seq.request_id != rid for p in plans[1:] for op in [*p.prefills, *p.decodes])
    assert eng.block_manager.num_free_blocks == eng.kv.num_blocks
