"""Asynchronous scheduling: the engine queues step N+1 on the device before it waits for step N,
and hands out N's outputs while N+1 runs, so the host's work per step (outputs, scheduling,
inputs, graph launch) overlaps the device's (``EngineConfig.async_scheduling``).

Step N+1 is planned as if every sequence of step N goes on: each gets ``PENDING_TOKEN`` as its
last token (the runner takes that input from step N's ids on the device,
``sagellm.engine.step_launch``) and the real token is written over it when it comes. A sequence
that the coming token ends by length is held out of step N+1; one that ends otherwise (a stop
token or string, an abort) has its next token computed and dropped. A request with a grammar
gets its next mask on the mask-fill worker, which waits for step N's tokens and lets the grammar
accept its token first (``sagellm.engine.mask_fill``) while N+1's forward is already queued; a
request with penalties counts its pending token from those ids on the device
(``TokenCountCache``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagellm.engine.generator_state import restore_generators, save_generators
from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.plan import StepPlan
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch

if TYPE_CHECKING:
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.outputs import RequestOutput

logger = logging.getLogger("sagellm.engine")


def use_async_scheduling(engine: LLMEngine) -> bool:
    """Whether ``engine`` queues steps ahead: as ``config.async_scheduling`` says, ``None``
    meaning where the platform's ``Capabilities.async_steps`` is true; never for a multi-rank
    engine or a runner that overrides ``execute`` (those run each step synchronously)."""
    mode = engine.config.async_scheduling
    if mode is False:
        return False
    runner = engine.runner
    capable = (engine.workers is None and isinstance(runner, ModelRunner)
               and type(runner).execute is ModelRunner.execute)
    if not capable:
        if mode:
            logger.warning("async_scheduling needs a one-rank engine whose runner queues steps "
                           "(ModelRunner.launch); %s runs each step synchronously",
                           type(runner).__name__)
        return False
    return bool(mode) or engine.platform.capabilities().async_steps


@dataclass
class InFlight:
    """A queued step: its plan, its launch, and where each sampling sequence's
    ``PENDING_TOKEN`` is once the step is committed ahead (by request id)."""

    plan: StepPlan
    launch: StepLaunch
    pending: dict[str, int] = field(default_factory=dict)


class StepPipeline:
    """``LLMEngine.step`` with one step queued ahead; built by the engine, which it drives
    through the engine's own commit, advance and failure paths."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        #: The step queued on the device, not yet waited for.
        self.inflight: InFlight | None = None

    def has_live_work(self) -> bool:
        """Whether the queued step computes for a request still running (one whose requests
        all ended is not work left: the next :meth:`step` waits for it and drops it)."""
        return self.inflight is not None and any(self.is_live(s) for s in self.inflight.launch.seqs)

    def step(self) -> list[RequestOutput]:
        """Queue the next step behind the running one (planning it first), then wait for the
        running one and turn its tokens into outputs."""
        engine = self.engine
        cur, self.inflight = self.inflight, None
        if cur is None:
            plan = engine.scheduler.schedule()
            if plan.is_empty:
                return []
            cur = self._launch(plan, None)
            if cur is None:  # raised while queueing: run it again one request at a time
                return engine._run(plan)
        nxt: InFlight | None = None
        retry: StepPlan | None = None
        hold = self._commit_ahead(cur)
        plan = engine.scheduler.schedule(hold)
        if not plan.is_empty:
            nxt = self._launch(plan, cur.launch)
            if nxt is None:
                retry = plan  # run synchronously once ``cur``'s tokens are in
        outputs = self._finish(cur)
        if retry is not None:
            outputs += engine._run(self.live(retry))
        self.inflight = nxt
        return outputs

    def _launch(self, plan: StepPlan, prev: StepLaunch | None) -> InFlight | None:
        """Queue ``plan``; ``None`` if queueing it raised (nothing of it committed, seeded
        generators rewound: the caller runs it again through ``LLMEngine._run``)."""
        engine = self.engine
        generators = save_generators(plan.sampling_seqs())
        try:
            launch = engine.runner.launch(plan, prev)  # type: ignore[attr-defined]
        except Exception as exc:
            if engine.platform.is_fatal_error(exc):
                raise
            logger.warning("queueing step %d failed (%s: %s); running it synchronously",
                           plan.step_id, type(exc).__name__, exc)
            restore_generators(generators)
            return None
        return InFlight(plan, launch)

    def _commit_ahead(self, cur: InFlight) -> list[str]:
        """Commit the running step before its tokens are known and give each of its sampling
        sequences a ``PENDING_TOKEN``; returns those that the coming token ends by length (held
        out of the next step)."""
        plan = self.live(cur.plan)
        self.engine._commit(plan)
        max_model_len = self.engine.max_model_len
        hold = []
        for seq in plan.sampling_seqs():
            cur.pending[seq.request_id] = seq.num_tokens
            seq.append_token(PENDING_TOKEN)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
                hold.append(seq.request_id)
        return hold

    def _finish(self, cur: InFlight) -> list[RequestOutput]:
        """Wait for ``cur`` (committed ahead) and advance its live sequences (those aborted,
        failed or ended while it ran are skipped)."""
        engine = self.engine
        try:
            tokens = cur.launch.result()
        except Exception as exc:
            if engine.platform.is_fatal_error(exc):
                raise
            # The step was queued and gave nothing: its sampling requests fail with it.
            logger.warning("step %d failed on the device (%s: %s)", cur.plan.step_id,
                           type(exc).__name__, exc)
            return [out for seq in cur.launch.seqs if self.is_live(seq)
                    for out in engine._fail(seq, exc, cur.pending.get(seq.request_id))]
        return engine._advance_each((seq, tok, cur.pending.get(seq.request_id))
                                    for seq, tok in zip(cur.launch.seqs, tokens, strict=True)
                                    if self.is_live(seq))

    def is_live(self, seq: SequenceState) -> bool:
        """Whether ``seq`` is still the engine's and unfinished (not aborted, failed or ended
        while a step computed it)."""
        return self.engine._seqs.get(seq.request_id) is seq and not seq.status.finished

    def live(self, plan: StepPlan) -> StepPlan:
        """``plan`` less the ops of sequences no longer live."""
        gone = {op.seq.request_id for op in (*plan.prefills, *plan.decodes)
                if not self.is_live(op.seq)}
        return plan.without(gone) if gone else plan
