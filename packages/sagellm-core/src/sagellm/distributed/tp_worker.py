"""Tensor parallelism across processes: rank 0 ships each step's inputs, every rank runs its shard.

Rank 0 runs the whole engine (scheduler, sampling, detokenisation). For each step its runner
builds the model inputs as usual, broadcasts them (tensors only, see :mod:`sagellm.distributed.wire`)
and runs the forward; the other ranks run the same forward on their shard of the weights and KV
heads. Row-parallel layers and the vocabulary-parallel embedding all-reduce, the LM head
all-gathers, all through the ``CommBackend``; only rank 0 samples.
"""

from __future__ import annotations

import torch

from sagellm.distributed.launcher import CMD_SHUTDOWN, CMD_STEP, WorkerGroup
from sagellm.distributed.wire import Channel
from sagellm.engine.builder import EngineParts
from sagellm.engine.layout import Layout
from sagellm.engine.model_runner import ModelInput, ModelRunner
from sagellm.engine.plan import StepPlan
from sagellm.engine.runner_context import RunnerContext
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.step_launch import StepLaunch
from sagellm.protocols import CommBackend


class TPDriverRunner(ModelRunner):
    """Rank 0's runner: :class:`ModelRunner`, plus the broadcast of every step's inputs."""

    def __init__(self, ctx: RunnerContext, workers: WorkerGroup) -> None:
        super().__init__(ctx)
        self.workers = workers

    def prepare(self, plan: StepPlan, prev: StepLaunch | None = None) -> ModelInput:
        inp = super().prepare(plan, prev)
        self.workers.channel.send(CMD_STEP, inp)
        return inp

    def execute(self, plan: StepPlan) -> list[int]:
        return self.workers.run_step(lambda: super(TPDriverRunner, self).execute(plan))  # type: ignore[no-any-return]


class TensorParallelLayout(Layout):
    """Rank 0 of a tensor-parallel engine: core's scheduler, a runner that drives every rank.

    Every rank runs core's eager runner: a platform runner that replays captured graphs would
    skip the step broadcast and leave the other ranks waiting.
    """

    def __init__(self, workers: WorkerGroup) -> None:
        super().__init__(workers.config, workers.tp, workers)
        self.group = workers

    def make_runner(self, parts: EngineParts, scheduler: Scheduler) -> TPDriverRunner:
        self.group.attached = True
        return TPDriverRunner(parts.runner_context(), self.group)


@torch.inference_mode()
def serve_tensor_parallel(parts: EngineParts, comm: CommBackend) -> None:
    """The loop of a rank other than 0: run each step rank 0 sends until it says stop."""
    runner = ModelRunner(parts.runner_context())
    channel = Channel(comm, src=0)
    while True:
        command, msg = channel.recv()
        if command == CMD_SHUTDOWN:
            return
        if command != CMD_STEP:
            raise RuntimeError(f"unexpected command {command} on a tensor-parallel rank")
        assert isinstance(msg, ModelInput)
        hidden = runner.forward(msg)
        if msg.logits_indices.numel():
            # The LM head all-gathers: take part, drop the logits (rank 0 samples).
            parts.model.compute_logits(hidden)  # type: ignore[operator]
