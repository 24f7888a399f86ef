"""Continuous batching with separate prefill and decode budgets.

Every step: running sequences decode first (one token each, within ``max_num_seqs``); then the
remaining token budget, capped by ``max_prefill_tokens`` (by ``max_prefill_tokens_decoding``
when the step also decodes, or running sequences sit out a step with a token on its way), goes
to prefills, resuming chunked prompts before admitting new ones. When the KV pool cannot hold a
decode, the most recently admitted sequence is preempted by recompute: its blocks are freed and it goes back to the front
of the waiting queue, keeping the tokens it generated. Before planning, running sequences give
back the blocks that fell out of the model's sliding window (when every layer has one).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sagellm.engine.block_manager import BlockManager
from sagellm.engine.plan import DecodeOp, PrefillOp, StepPlan
from sagellm.engine.sequence import SequenceState, SequenceStatus

logger = logging.getLogger("sagellm.scheduler")


@dataclass
class Budget:
    """Tokens one step may still plan: all kinds together, and prefill tokens."""

    tokens: int
    prefill: int


class Scheduler:
    """Plans each step; the algorithm is :meth:`schedule`, the decisions it delegates are the
    methods under "the decisions a subclass may change"."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int, max_prefill_tokens_decoding: int | None = None) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens = max_prefill_tokens
        #: The prefill budget of a step that also decodes (``None``: ``max_prefill_tokens``).
        self.max_prefill_tokens_decoding = max_prefill_tokens_decoding
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.num_steps = 0
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: SequenceState) -> None:
        """Queue ``seq``; a prompt that could not be computed even with the pool to itself is
        refused (``ValueError``) here rather than left waiting forever.

        With a sliding window on every layer the need is the window plus one prefill chunk
        (``BlockManager.max_blocks_held``), not the whole prompt: so a prompt longer than the
        pool runs, while the oldest running sequence can still always preempt the others until
        its next step fits, as without a window.
        """
        for bm, where in self._pools():
            need = self._max_blocks_held(bm, seq.num_tokens)
            if need > bm.num_blocks:
                capacity = bm.num_blocks * bm.block_size
                if bm.kv_window is None or need == -(-seq.num_tokens // bm.block_size):
                    why = f"its {seq.num_tokens} tokens"
                else:
                    why = (f"its {bm.kv_window}-token sliding window plus a "
                           f"{self.chunk_tokens}-token prefill chunk (max_prefill_tokens)")
                raise ValueError(
                    f"request {seq.request_id} needs {need} KV blocks for {why}; the {where}pool "
                    f"has {bm.num_blocks} ({capacity} tokens of KV capacity): shorten the prompt "
                    f"(max_model_len should not exceed the KV capacity) or raise num_kv_blocks")
        self.waiting.append(seq)

    @property
    def chunk_tokens(self) -> int:
        """Most tokens of one sequence computed in one step."""
        return max(1, min(self.max_num_batched_tokens, self.max_prefill_tokens))

    def add_forked(self, seqs: list[SequenceState]) -> None:
        """Put forked sequences (``BlockManager.fork``) at the head of the waiting queue, in
        order: they hold shared blocks already and have only a short tail to compute."""
        self.waiting.extendleft(reversed(seqs))

    def abort(self, request_id: str) -> SequenceState | None:
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

    def schedule(self, hold: Collection[str] = ()) -> StepPlan:
        """Plan the next step. ``hold``: running sequences left out of it and never preempted
        for it (asynchronous scheduling: each has a token on its way that ends it)."""
        self.num_steps += 1
        plan = StepPlan(step_id=self.num_steps)
        budget = Budget(self.max_num_batched_tokens, self.max_prefill_tokens)
        scheduled: set[str] = set(hold)
        self._release_out_of_window()

        decoding: list[SequenceState] = []
        resuming: list[SequenceState] = []
        for seq in self.running:
            (decoding if self._decodes(seq) else resuming).append(seq)

        # 1. Decodes of running sequences, oldest first; preempt the newest when out of blocks.
        for seq in decoding:
            if budget.tokens <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.request_id in hold:
                continue  # preempted earlier in this loop, or held
            if not self._make_room(self.block_manager, seq, 1, scheduled, plan,
                                   self._decode_victim):
                self._preempt(seq, plan)
                continue
            self.block_manager.allocate(seq, 1)
            plan.decodes.append(DecodeOp(seq))
            scheduled.add(seq.request_id)
            budget.tokens -= 1

        # A step that decodes (or follows one whose tokens are on their way) keeps its prefill
        # short, so prompts arriving now delay those requests' next token by one chunk.
        if (plan.decodes or hold) and self.max_prefill_tokens_decoding is not None:
            budget.prefill = min(budget.prefill, self.max_prefill_tokens_decoding)

        # 2. Resume chunked prefills of running sequences, oldest first (those preempted by
        # step 1 are skipped: they are waiting again).
        for seq in resuming:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            n = self._prefill_tokens(seq, budget)
            if n <= 0:
                break
            n = self._fit_prefill(seq, n, scheduled, plan)
            if n > 0:
                self._schedule_prefill(seq, n, plan, budget, scheduled)

        # 3. Admit waiting sequences (preempted ones first) while budgets, slots and blocks allow.
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit_tokens(seq, budget, scheduled, plan)
            if n <= 0:
                break
            self._admit(self.waiting.popleft())
            self._schedule_prefill(seq, n, plan, budget, scheduled)

        if plan.is_empty and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"cannot schedule {seq.request_id}: {seq.num_tokens} tokens do not "
                               f"fit {self._pool_description()}")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(plan.describe())
        return plan

    def _schedule_prefill(self, seq: SequenceState, n: int, plan: StepPlan, budget: Budget,
                          scheduled: set[str]) -> None:
        self._add_prefill(seq, n, plan)
        scheduled.add(seq.request_id)
        budget.tokens -= n
        budget.prefill -= n

    def _make_room(self, bm: BlockManager, seq: SequenceState, num_tokens: int,
                   scheduled: set[str], plan: StepPlan,
                   eligible: Callable[[SequenceState], bool]) -> bool:
        """Preempt the newest unscheduled ``eligible`` running sequences until ``seq`` fits ``bm``."""
        while not bm.can_allocate(seq, num_tokens):
            victim = next((s for s in reversed(self.running) if s is not seq
                           and s.request_id not in scheduled and eligible(s)), None)
            if victim is None:
                return False
            self._preempt(victim, plan)
        return True

    # -- the decisions a subclass may change (``sagellm.distributed.disagg`` does) -----------

    def _release_out_of_window(self) -> None:
        """Give back the blocks of running sequences that their next queries cannot read."""
        if self.block_manager.kv_window is None:
            return  # every block stays readable
        for seq in self.running:
            self.block_manager.release_out_of_window(seq)

    def _max_blocks_held(self, bm: BlockManager, num_tokens: int) -> int:
        """Most blocks of ``bm`` a sequence of ``num_tokens`` tokens holds at once."""
        return bm.max_blocks_held(num_tokens, self.chunk_tokens)

    def _pools(self) -> list[tuple[BlockManager, str]]:
        """The pools a request must fit, each with its name in messages."""
        return [(self.block_manager, "")]

    def _pool_description(self) -> str:
        return f"the KV pool of {self.block_manager.num_blocks} blocks"

    def _decodes(self, seq: SequenceState) -> bool:
        """Whether running ``seq`` decodes this step (else it resumes a chunked prefill)."""
        return not seq.is_prefill

    def _decode_victim(self, seq: SequenceState) -> bool:
        """Whether running ``seq`` may be preempted to make room for a decode."""
        return True

    def _prefill_tokens(self, seq: SequenceState, budget: Budget) -> int:
        """How many of running ``seq``'s uncomputed tokens the budgets allow (0: stop resuming)."""
        return min(seq.num_uncomputed_tokens, budget.tokens, budget.prefill)

    def _fit_prefill(self, seq: SequenceState, n: int, scheduled: set[str], plan: StepPlan
                     ) -> int:
        """Tokens of a resumed prefill that get blocks (preempting others); 0: not this step."""
        bm = self.block_manager
        if self._make_room(bm, seq, n, scheduled, plan, self._decode_victim):
            return n
        # Take what fits; with nothing at all, give the blocks back and wait.
        n = (bm.num_free_blocks + len(seq.block_table)) * bm.block_size - seq.num_computed_tokens
        if n <= 0:
            self._preempt(seq, plan)
        return n

    def _admit_tokens(self, seq: SequenceState, budget: Budget, scheduled: set[str],
                      plan: StepPlan) -> int:
        """Tokens to prefill of the next waiting ``seq`` (its cached prefix reused); 0: wait."""
        bm = self.block_manager
        if not seq.needs_prompt_logits:  # prompt logprobs need every position computed
            bm.acquire_cached_prefix(seq)
        n = min(seq.num_uncomputed_tokens, budget.tokens, budget.prefill)
        if n > 0 and not bm.can_allocate(seq, n) and bm.kv_window is not None and not self.running:
            # A windowed sequence recomputing more tokens than its prompt (preempted after it
            # generated some) may need more than the pool for a whole first chunk, yet runs in
            # shorter ones, each step freeing what falls out of the window.
            n = min(n, (bm.num_free_blocks + len(seq.block_table)) * bm.block_size
                    - seq.num_computed_tokens)
        if n <= 0 or not bm.can_allocate(seq, n):
            bm.release_cached_prefix(seq)  # give the cached prefix back until it can run
            return 0
        return n

    def _admit(self, seq: SequenceState) -> None:
        """Move ``seq``, just taken off the waiting queue, to the running ones."""
        seq.status = SequenceStatus.RUNNING
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = time.monotonic()
        self.running.append(seq)

    def _add_prefill(self, seq: SequenceState, n: int, plan: StepPlan) -> None:
        """Allocate ``n`` more tokens of ``seq`` and add their prefill op to ``plan``."""
        self.block_manager.allocate(seq, n)
        plan.prefills.append(PrefillOp(seq, seq.num_computed_tokens, seq.num_computed_tokens + n))

    def _release(self, seq: SequenceState) -> None:
        """Give back every KV block ``seq`` holds (preemption, finish, abort)."""
        self.block_manager.free(seq)

    def _preempt(self, seq: SequenceState, plan: StepPlan) -> None:
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
        for op in plan.prefills:
            op.seq.num_computed_tokens = op.end
        for op in plan.decodes:
            op.seq.num_computed_tokens = op.seq.num_tokens
        self._committed(plan)

    def _committed(self, plan: StepPlan) -> None:
        """After :meth:`commit` marked the tokens: hash the blocks they filled (prefix caching)."""
        bm = self.block_manager
        for op in plan.prefills:
            bm.register_computed_blocks(op.seq)
        for op in plan.decodes:
            if op.seq.num_computed_tokens % bm.block_size == 0:
                bm.register_computed_blocks(op.seq)

    def finish(self, seq: SequenceState, status: SequenceStatus) -> None:
        """End ``seq``, running or (preempted while its last token was on its way) waiting;
        its status may already say finished (the engine sets it before calling this)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, status)

    def _finish(self, seq: SequenceState, status: SequenceStatus) -> None:
        seq.status = status
        self._release(seq)
