"""Tensor parallelism across processes: rank 0 ships each step's inputs, every rank runs its shard.

Rank 0 runs the whole engine (scheduler, sampling, detokenisation). For each step its runner
builds the model inputs as usual, broadcasts them (tensors only, see :mod:`sagellm.distributed.wire`)
and runs the forward; the other ranks run the same forward on their shard of the weights and KV
heads. Row-parallel layers and the vocabulary-parallel embedding all-reduce, the LM head
all-gathers, all through the ``CommBackend``; only rank 0 samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sagellm.distributed.launcher import CMD_SHUTDOWN, CMD_STEP, WorkerGroup
from sagellm.distributed.wire import Channel, register_wire_type
from sagellm.engine.model_runner import ModelInput, ModelRunner
from sagellm.engine.plan import StepPlan
from sagellm.protocols import CommBackend

if TYPE_CHECKING:
    from sagellm.engine.llm_engine import LLMEngine


@register_wire_type
@dataclass
class TPStep:
    """One step for the non-zero ranks: block copies to apply first, then the model input."""

    #: ``(src, dst)`` pairs, flattened.
    copies: list[int]
    inp: ModelInput


def min_over_ranks(comm: CommBackend, value: int) -> int:
    """The smallest ``value`` over all ranks (KV pool sizes must agree: block ids are shared)."""
    t = torch.tensor([value], dtype=torch.int64, device=comm.device)
    return int(comm.all_gather(t, dim=0).min().item())


class TPDriverRunner(ModelRunner):
    """Rank 0's runner: :class:`ModelRunner`, plus the broadcast of every step's inputs."""

    def __init__(self, engine: LLMEngine, workers: WorkerGroup) -> None:
        super().__init__(engine.model, engine.kv, engine.attention, engine.device,
                         engine.config.block_size)
        self.workers = workers

    def prepare(self, plan: StepPlan) -> ModelInput:
        inp = super().prepare(plan)
        copies = [i for pair in plan.blocks_to_copy for i in pair]
        self.workers.channel.send(CMD_STEP, TPStep(copies, inp))
        return inp

    def execute(self, plan: StepPlan) -> list[int]:
        return self.workers.run_step(lambda: super(TPDriverRunner, self).execute(plan))


def attach_tensor_parallel(engine: LLMEngine, workers: WorkerGroup) -> None:
    engine.runner = TPDriverRunner(engine, workers)


@torch.inference_mode()
def serve_tensor_parallel(engine: LLMEngine, comm: CommBackend) -> None:
    """The loop of a rank other than 0: run each step rank 0 sends until it says stop."""
    runner = ModelRunner(engine.model, engine.kv, engine.attention, engine.device,
                         engine.config.block_size)
    channel = Channel(comm, src=0)
    while True:
        command, msg = channel.recv()
        if command == CMD_SHUTDOWN:
            return
        if command != CMD_STEP:
            raise RuntimeError(f"unexpected command {command} on a tensor-parallel rank")
        assert isinstance(msg, TPStep)
        if msg.copies:
            c = msg.copies
            engine.kv.copy_blocks([(c[i], c[i + 1]) for i in range(0, len(c), 2)])
        hidden = runner.forward(msg.inp)
        if msg.inp.logits_indices.numel():
            # The LM head all-gathers: take part, drop the logits (rank 0 samples).
            engine.model.compute_logits(hidden)  # type: ignore[operator]
