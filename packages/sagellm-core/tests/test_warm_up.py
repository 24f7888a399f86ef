"""The start-up warm-up step (``sagellm.engine.warm_up``) on the CPU runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.config import EngineConfig
from sagellm.engine import warm_up
from sagellm.engine.llm_engine import LLMEngine
from sagellm.runner import ModelRunner, warm_up_step
from sagellm.sampling_params import SamplingParams


def _engine(model: Path, **kw: object) -> LLMEngine:
    cfg = dict(model=str(model), backend="cpu", dtype="float32", block_size=4,
               num_kv_blocks=256, max_model_len=256)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))  # type: ignore[arg-type]


def _generate(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
    return tokens


def test_samples_every_row_and_gives_the_blocks_back(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    kv = engine.runner.kv
    free = kv.num_free_blocks
    assert warm_up_step(engine.runner) == len(warm_up.PREFILLS) + len(warm_up.DECODES)
    assert kv.num_free_blocks == free
    # The engine serves normally after it; nothing of the step reached the scheduler.
    assert not engine.has_unfinished_requests()
    assert len(_generate(engine, [5, 6, 7, 8, 9], 3)) == 3


def test_whole_prompt_rows_are_the_models_own_tokens(tiny_llama_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The greedy whole-prompt row (the third prefill) samples what a lone run of its prompt
    samples: the step is a real forward over its rows, not a no-op."""
    engine = _engine(tiny_llama_dir)
    seen: dict[str, list[int]] = {}
    real = ModelRunner.execute

    def recording(self: ModelRunner, plan):  # type: ignore[no-untyped-def]
        tokens = real(self, plan)
        seen["prompt"] = list(plan.prefills[2].seq.token_ids)
        seen["tokens"] = tokens
        return tokens

    monkeypatch.setattr(ModelRunner, "execute", recording)
    warm_up_step(engine.runner)
    monkeypatch.setattr(ModelRunner, "execute", real)
    assert seen["tokens"][2] == _generate(engine, seen["prompt"], 1)[0]


def test_skipped_when_the_pool_or_the_context_is_too_small(tiny_llama_dir: Path) -> None:
    need = warm_up.blocks_needed(4)
    small = _engine(tiny_llama_dir, num_kv_blocks=need - 1)
    assert warm_up_step(small.runner) is None
    assert small.runner.kv.num_free_blocks == need - 1
    short = _engine(tiny_llama_dir, max_model_len=64)
    assert warm_up_step(short.runner) is None


def test_blocks_come_back_when_the_step_raises(tiny_llama_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(tiny_llama_dir)
    free = engine.runner.kv.num_free_blocks

    def boom(self: ModelRunner, plan):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(ModelRunner, "execute", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        warm_up_step(engine.runner)
    assert engine.runner.kv.num_free_blocks == free


def test_shapes_are_the_ones_first_use_compiles_miss() -> None:
    """Several prompts, one chunk over cached context, several decodes; no length of 1 or a
    multiple of 16 (Triton's integer specializations); only whole prompts sample with a
    temperature or ask for logprobs."""
    assert len(warm_up.PREFILLS) > 1 and len(warm_up.DECODES) > 1
    assert any(start > 0 for _, start in warm_up.PREFILLS)
    lengths = [n - s for n, s in warm_up.PREFILLS] + list(warm_up.DECODES)
    assert all(n > 1 and n % 16 for n in lengths)
    for i, p in enumerate(warm_up.PARAMS):
        if p.temperature > 0 or p.logprobs is not None:
            assert i < len(warm_up.PREFILLS) and warm_up.PREFILLS[i][1] == 0
    assert torch.tensor([p.temperature for p in warm_up.PARAMS]).gt(0).any()
