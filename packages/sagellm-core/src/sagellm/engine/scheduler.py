"""Continuous batching with separate prefill and decode budgets.

Every step: running sequences decode first (one token each, within ``max_num_seqs``); then the
remaining token budget, capped by ``max_prefill_tokens``, goes to prefills, resuming chunked
prompts before admitting new ones. When the KV pool cannot hold a decode, the most recently
admitted sequence is preempted by recompute: its blocks are freed and it goes back to the front
of the waiting queue, keeping the tokens it generated.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from sagellm.engine.block_manager import BlockManager
from sagellm.engine.plan import DecodeOp, PrefillOp, StepPlan
from sagellm.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger("sagellm.scheduler")


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        need = -(-seq.num_tokens // self.block_manager.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"request {seq.request_id} needs {need} KV blocks; the pool has "
                             f"{self.block_manager.num_blocks}")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, SequenceStatus.FINISHED_ABORTED)
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- planning --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self.num_steps += 1
        plan = StepPlan(step_id=self.num_steps)
        bm = self.block_manager
        token_budget = self.max_num_batched_tokens
        prefill_budget = self.max_prefill_tokens
        scheduled: set[str] = set()

        # 1. Decodes of running sequences, oldest first; preempt the newest when out of blocks.
        for seq in [s for s in self.running if not s.is_prefill]:
            if token_budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if not self._make_room(seq, 1, scheduled, plan):
                self._preempt(seq, plan)
                continue
            bm.allocate(seq, 1)
            plan.decodes.append(DecodeOp(seq))
            scheduled.add(seq.request_id)
            token_budget -= 1

        # 2. Resume chunked prefills of running sequences, oldest first.
        for seq in [s for s in self.running if s.is_prefill]:
            n = min(seq.num_uncomputed_tokens, token_budget, prefill_budget)
            if n <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if not self._make_room(seq, n, scheduled, plan):
                # Take what fits; with nothing at all, give the blocks back and wait.
                n = (bm.num_free_blocks + len(seq.block_table)) * bm.block_size - seq.num_computed_tokens
                if n <= 0:
                    self._preempt(seq, plan)
                    continue
            bm.allocate(seq, n)
            plan.prefills.append(PrefillOp(seq, seq.num_computed_tokens, seq.num_computed_tokens + n))
            scheduled.add(seq.request_id)
            token_budget -= n
            prefill_budget -= n

        # 3. Admit waiting sequences (preempted ones first) while budgets, slots and blocks allow.
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            bm.acquire_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, token_budget, prefill_budget)
            if n <= 0 or not bm.can_allocate(seq, n):
                if seq.block_table:  # give the cached prefix back until it can run
                    bm.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            bm.allocate(seq, n)
            plan.prefills.append(PrefillOp(seq, seq.num_computed_tokens, seq.num_computed_tokens + n))
            scheduled.add(seq.request_id)
            token_budget -= n
            prefill_budget -= n

        if plan.is_empty and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"cannot schedule {seq.request_id}: {seq.num_tokens} tokens do not "
                               f"fit the KV pool of {bm.num_blocks} blocks")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(plan.describe())
        return plan

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[str], plan: StepPlan) -> bool:
        """Preempt the newest unscheduled running sequences until ``seq`` fits."""
        bm = self.block_manager
        while not bm.can_allocate(seq, num_tokens):
            victim = next((s for s in reversed(self.running)
                           if s is not seq and s.request_id not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim, plan)
        return True

    def _release(self, seq: Sequence) -> None:
        """Give back every KV block ``seq`` holds (preemption, finish, abort)."""
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq.request_id)

    # -- results ---------------------------------------------------------------------------

    def commit(self, plan: StepPlan) -> None:
        """Mark the plan's tokens as computed (called after the forward, before sampling)."""
        bm = self.block_manager
        for op in plan.prefills:
            op.seq.num_computed_tokens = op.end
            bm.register_computed_blocks(op.seq)
        for op in plan.decodes:
            op.seq.num_computed_tokens = op.seq.num_tokens
            if op.seq.num_computed_tokens % bm.block_size == 0:
                bm.register_computed_blocks(op.seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, status)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self._release(seq)
