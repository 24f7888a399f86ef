"""Sliding-window block release, end to end: greedy tokens equal transformers' while every
running sequence holds no more blocks than its window and the step's new tokens span.

Used by core's CPU tests (``tests/test_window_blocks.py``) and the CUDA package's GPU run.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.engine.plan import StepPlan
from sagellm.protocols import NO_BLOCK, Platform


def window_block_bound(window: int, block_size: int, num_new_tokens: int) -> int:
    """Blocks a sequence may hold while it computes ``num_new_tokens`` tokens from position
    ``c``: keys ``c - window + 1 .. c + num_new_tokens - 1``, one block more for alignment."""
    return -(-(window - 1 + num_new_tokens) // block_size) + 1


@dataclass
class WindowRun:
    """What :func:`run_windowed` saw."""

    tokens: list[list[int]]
    #: Most blocks held in the pool (neither free nor evictable) after any step's planning.
    max_held_blocks: int = 0
    #: Per step: (sequence, blocks it held, the bound it had to stay under).
    violations: list[tuple[str, int, int]] = field(default_factory=list)
    num_released_blocks: int = 0
    num_preemptions: int = 0
    num_steps: int = 0


def run_windowed(platform: Platform, model_dir: str | Path, prompts: Sequence[Sequence[int]],
                 max_tokens: int, preempt_every: int | None = None, **config: Any) -> WindowRun:
    """Greedy-decode ``prompts`` on ``platform`` (settings of ``greedy_engine`` plus
    ``config``), checking after every step's planning that each scheduled sequence holds at
    most :func:`window_block_bound` blocks and that no entry it will read is ``NO_BLOCK``.

    ``preempt_every``: before every that many steps, preempt (by recompute, as the scheduler
    does when the pool runs short) the oldest running sequence that has released blocks."""
    from sagellm.testing.tiny_model import greedy_engine, run_greedy

    engine = greedy_engine(platform, model_dir, **config)
    bm = engine.scheduler.block_manager
    window = bm.kv_window
    assert window is not None, "the model is not windowed on every layer (nothing is freed)"
    schedule = engine.scheduler.schedule
    run = WindowRun(tokens=[])

    def checked_schedule(hold: Collection[str] = ()) -> StepPlan:
        step = engine.scheduler.num_steps + 1
        if preempt_every and step % preempt_every == 0:
            victim = next((s for s in engine.scheduler.running if s.num_released_blocks), None)
            if victim is not None:
                engine.scheduler._preempt(victim, StepPlan(step_id=0))
        plan = schedule(hold)
        run.max_held_blocks = max(run.max_held_blocks, bm.num_held_blocks)
        ops = [(op.seq, op.start, op.num_tokens) for op in plan.prefills]
        ops += [(op.seq, op.position, 1) for op in plan.decodes]
        for seq, start, n in ops:
            held = sum(1 for b in seq.block_table if b != NO_BLOCK)
            bound = window_block_bound(window, bm.block_size, n)
            if held > bound:
                run.violations.append((seq.request_id, held, bound))
            needed = seq.block_table[bm.first_window_block(start):]
            assert NO_BLOCK not in needed, f"{seq.request_id} lost a block inside its window"
        return plan

    engine.scheduler.schedule = checked_schedule  # type: ignore[method-assign]
    _, run.tokens = run_greedy(engine, prompts, max_tokens)
    run.num_released_blocks = bm.num_window_released_blocks
    run.num_preemptions = engine.scheduler.num_preemptions
    run.num_steps = engine.scheduler.num_steps
    assert bm.num_held_blocks == 0, "blocks still held after every request finished"
    engine.shutdown()
    return run
