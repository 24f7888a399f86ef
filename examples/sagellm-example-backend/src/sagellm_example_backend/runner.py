"""A model runner of our own: core's, plus a step counter (where a real backend would replay
graphs or fuse the sampler). It uses only the public contract of ``sagellm.runner``."""

from __future__ import annotations

from sagellm.runner import ModelRunner, RunnerContext, StepPlan


class ExampleModelRunner(ModelRunner):
    def __init__(self, ctx: RunnerContext) -> None:
        super().__init__(ctx)
        self.num_steps = 0

    def execute(self, plan: StepPlan) -> list[int]:
        # The engine may call this again with parts of a plan that failed, before committing
        # anything, so a runner keeps no per-plan state between calls.
        self.num_steps += 1
        return super().execute(plan)
