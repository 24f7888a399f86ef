"""The start-up memory profile (``sagellm.engine.builder``): its step holds the whole step
budget, in prompts no longer than the context, as the largest real step can."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.config import EngineConfig
from sagellm.engine import builder
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.runner_context import RunnerContext


def test_prompt_lengths_fill_the_budget_within_the_context() -> None:
    assert builder.profile_prompt_lengths(8192, 4096) == [4096, 4096]
    assert builder.profile_prompt_lengths(8192, 3000) == [3000, 3000, 2192]
    assert builder.profile_prompt_lengths(2048, 4096) == [2048]
    with pytest.raises(ValueError, match="needs tokens"):
        builder.profile_prompt_lengths(0, 4096)


def test_profile_step_runs_the_budget_and_never_passes_the_context(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the profile prefilled min(budget, context) tokens: with a 64-token context and
    a 200-token budget it measured a step a third the size of the largest one."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), backend="cpu", dtype="float32",
                                    block_size=4, num_kv_blocks=64, max_model_len=64))
    runner = engine.runner
    seen: list[tuple[int, int, int]] = []
    real = ModelRunner.forward

    def recording(self: ModelRunner, inp):  # type: ignore[no-untyped-def]
        seen.append((int(inp.input_ids.numel()), int(inp.positions.max()),
                     int(inp.attn_metadata.prefill.cu_seqlens_q.numel()) - 1))
        return real(self, inp)

    monkeypatch.setattr(ModelRunner, "forward", recording)
    platform = runner.platform

    def context(kv):  # type: ignore[no-untyped-def]
        return RunnerContext(runner.model, kv, runner.attention, platform, runner.config,
                             runner.block_size, 64)

    spec = runner.kv.spec
    peak = builder._profile_activation_bytes(platform, spec, 200, 64, context)  # noqa: SLF001
    assert peak >= 0
    assert seen == [(200, 63, 4)]  # 64 + 64 + 64 + 8 tokens, positions 0..63
