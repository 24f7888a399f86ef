"""Prefill/decode disaggregation: prompts are computed on one worker and decoded on another.

Rank 0 is the engine the user talks to and the **decode worker**: its device and KV pool run the
decode steps, and it schedules and samples everything. Rank 1 is the **prefill worker**, with its
own device, its own copy of the model and its own KV pool. Each step:

1. The :class:`DisaggScheduler` plans decodes on the decode pool and prefills (chunked as usual)
   on the prefill pool. A prefill op that finishes a prompt also allocates the prompt's blocks in
   the decode pool and adds a ``KVTransferOp`` (prefill-side ids -> decode-side ids) to the plan.
2. The :class:`DisaggRunner` broadcasts the prefill inputs to rank 1 and runs the decodes locally
   meanwhile; rank 1 runs the prefill, broadcasts back the hidden states of the rows that sample
   (rank 0 computes their logits and samples, so sampling has one home), then sends the finished
   prompts' KV blocks with ``CommBackend.send_kv_blocks``; rank 0 receives them into the decode
   pool with ``recv_kv_blocks``.
3. On commit the sequence's prefill blocks are freed and its block table becomes the decode-side
   one; from the next step it decodes on rank 0.

Rank 0 keeps the bookkeeping of both pools; the prefill pool's is a :class:`RemoteBlockPool`
whose allocations and frees are replayed on rank 1 with every message, where they are checked
against what the step writes - so "blocks freed on both sides" is observable on both sides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from sagellm.backends.free_list import BlockFreeList
from sagellm.distributed.launcher import CMD_PREFILL, CMD_SHUTDOWN, CMD_STATS, WorkerGroup
from sagellm.distributed.wire import Channel, register_wire_type
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.builder import EngineParts
from sagellm.engine.layout import Layout
from sagellm.engine.model_runner import ModelInput, ModelRunner
from sagellm.engine.plan import KVTransferOp, PrefillOp, StepPlan
from sagellm.engine.scheduler import Budget, Scheduler
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import (
    CommBackend,
    KVBackend,
    KVCacheSpec,
    KVMemoryUsage,
)

logger = logging.getLogger("sagellm.disagg")

DECODE_RANK, PREFILL_RANK = 0, 1
_LOG_EVERY_S = 10.0


# --------------------------------------------------------------------------------------------
# The prefill pool as rank 0 sees it
# --------------------------------------------------------------------------------------------


class RemoteBlockPool(KVBackend):
    """Free list of a KV pool that lives on another rank; no memory here.

    Every allocation and free is also logged as an event (``id`` for allocate, ``-id - 1`` for
    free) that the next message carries to the owner of the memory.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int) -> None:
        super().__init__(spec, num_blocks, torch.device("meta"))
        self._free_list = BlockFreeList(num_blocks, what="prefill KV block")
        self._events: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return self._free_list.num_free

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        ids = self._free_list.allocate(num_blocks)
        self._events.extend(ids)
        return ids

    def free_blocks(self, block_ids: Seq[int]) -> None:
        # One id at a time, so that if a bad id raises, the ids freed before it are still logged
        # and rank 1 replays exactly the frees that happened here.
        for i in block_ids:
            self._free_list.free((i,))
            self._events.append(-i - 1)

    def take_events(self) -> list[int]:
        events, self._events = self._events, []
        return events

    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError("the prefill pool lives on the prefill worker")

    def get_memory_usage(self) -> KVMemoryUsage:
        return KVMemoryUsage(self.num_blocks, self._free_list.num_free, self.spec.block_size,
                             self.num_blocks * self.spec.bytes_per_block)


# --------------------------------------------------------------------------------------------
# Scheduling
# --------------------------------------------------------------------------------------------


class DisaggScheduler(Scheduler):
    """Decodes on the decode pool (``block_manager``), prefills on ``prefill_block_manager``.

    Budgets: ``max_num_batched_tokens`` bounds a decode step, ``max_prefill_tokens`` a prefill
    step (they run on different devices). A prompt's last chunk is only scheduled once its blocks
    fit the decode pool; those are allocated then, so the transfer always has a destination.
    """

    def __init__(self, block_manager: BlockManager, prefill_block_manager: BlockManager,
                 max_num_seqs: int, max_num_batched_tokens: int, max_prefill_tokens: int) -> None:
        super().__init__(block_manager, max_num_seqs, max_num_batched_tokens, max_prefill_tokens)
        self.prefill_block_manager = prefill_block_manager
        #: Requests whose KV lives on the prefill worker.
        self.prefilling: set[str] = set()
        #: Decode-side blocks reserved for this step's transfers, held by stand-in sequences.
        self._incoming: dict[str, SequenceState] = {}

    # The algorithm is Scheduler.schedule; these are the decisions disaggregation changes.

    def _release_out_of_window(self) -> None:
        """Nothing: a prompt's blocks move to the decode pool whole, so across the pair every
        block stays held until its sequence ends (no sliding-window freeing yet)."""

    def _max_blocks_held(self, bm: BlockManager, num_tokens: int) -> int:
        """Every block: nothing is released out of the window across the pair (see above)."""
        return -(-num_tokens // bm.block_size)

    def _pools(self) -> list[tuple[BlockManager, str]]:
        return [(self.block_manager, "decode "), (self.prefill_block_manager, "prefill ")]

    def _pool_description(self) -> str:
        return "the KV pools"

    def _decodes(self, seq: SequenceState) -> bool:
        return seq.request_id not in self.prefilling

    def _decode_victim(self, seq: SequenceState) -> bool:
        return seq.request_id not in self.prefilling  # a prefilling one holds no decode blocks

    def _prefill_tokens(self, seq: SequenceState, budget: Budget) -> int:
        return min(seq.num_uncomputed_tokens, budget.prefill)  # prefills run on another device

    def _fit_prefill(self, seq: SequenceState, n: int, scheduled: set[str], plan: StepPlan
                     ) -> int:
        """Room in the prefill pool (preempting newer prefills); a prompt's last chunk also
        waits until its blocks fit the decode pool."""
        pbm = self.prefill_block_manager
        if not self._make_room(pbm, seq, n, scheduled, plan, self._prefill_victim):
            n = (pbm.num_free_blocks + len(seq.block_table)) * pbm.block_size - seq.num_computed_tokens
        if n <= 0:
            return 0
        if seq.num_computed_tokens + n == seq.num_tokens:
            blocks = -(-seq.num_tokens // self.block_manager.block_size)
            if blocks > self.block_manager.num_free_blocks:
                return 0  # the decode pool is full: finish this prompt once decodes free blocks
        return n

    def _prefill_victim(self, seq: SequenceState) -> bool:
        return seq.request_id in self.prefilling

    def _admit_tokens(self, seq: SequenceState, budget: Budget, scheduled: set[str],
                      plan: StepPlan) -> int:
        if budget.prefill <= 0:
            return 0
        return self._fit_prefill(seq, min(seq.num_uncomputed_tokens, budget.prefill), scheduled,
                                 plan)

    def _admit(self, seq: SequenceState) -> None:
        super()._admit(seq)
        self.prefilling.add(seq.request_id)

    def _add_prefill(self, seq: SequenceState, n: int, plan: StepPlan) -> None:
        self.prefill_block_manager.allocate(seq, n)
        op = PrefillOp(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        plan.prefills.append(op)
        if op.samples:
            stand_in = SequenceState(seq.request_id, seq.token_ids, seq.params)
            self.block_manager.allocate(stand_in, seq.num_tokens)
            self._incoming[seq.request_id] = stand_in
            plan.kv_transfers.append(KVTransferOp(
                seq.request_id, list(seq.block_table), src=PREFILL_RANK, dst=DECODE_RANK,
                dst_block_ids=list(stand_in.block_table)))

    def _release(self, seq: SequenceState) -> None:
        """Free ``seq``'s blocks in whichever pool holds them."""
        rid = seq.request_id
        stand_in = self._incoming.pop(rid, None)
        if stand_in is not None:  # a step failed between planning and commit
            self.block_manager.free(stand_in)
        if rid in self.prefilling:
            self.prefilling.discard(rid)
            self.prefill_block_manager.free(seq)
        else:
            self.block_manager.free(seq)

    def _committed(self, plan: StepPlan) -> None:
        """Hand the transferred prompts' blocks to their sequences.

        No prefix caching across the pair yet: no block is hashed, so a freed block goes
        straight back to its pool on either side.
        """
        by_id = {op.seq.request_id: op.seq for op in plan.prefills}
        for t in plan.kv_transfers:
            seq = by_id[t.request_id]
            stand_in = self._incoming.pop(t.request_id)
            self.prefill_block_manager.free(seq)
            self.prefilling.discard(t.request_id)
            seq.block_table = stand_in.block_table
            self.block_manager.allocate(seq, 0)  # the sequence itself now holds the blocks



# --------------------------------------------------------------------------------------------
# Execution on rank 0
# --------------------------------------------------------------------------------------------


@register_wire_type
@dataclass
class PrefillStep:
    """What the prefill worker gets each step."""

    #: Allocations (``id``) and frees (``-id - 1``) of its pool since the last message.
    pool_events: list[int]
    inp: ModelInput
    #: Prefill-side blocks to send to the decode worker after the forward, in order.
    transfer_block_ids: list[int]


@register_wire_type
@dataclass
class PoolEvents:
    pool_events: list[int]


@dataclass
class TransferLog:
    num_blocks: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    num_transfers: int = 0

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class DisaggRunner:
    """Rank 0's runner: prefills go to rank 1, decodes run here, finished prompts' KV comes back."""

    def __init__(self, parts: EngineParts, workers: WorkerGroup, decode_runner: ModelRunner,
                 prefill_pool: RemoteBlockPool) -> None:
        self.parts = parts
        self.workers = workers
        self.comm = workers.comm
        self.channel = workers.channel
        self.decode_runner = decode_runner
        # Builds the prefill inputs (block tables of the prefill pool) and samples their rows.
        self.prefill_inputs = ModelRunner(parts.runner_context())
        self.prefill_pool = prefill_pool
        self.hidden_size = int(parts.loaded.hf_config.hidden_size)  # type: ignore[attr-defined]
        self.dtype = parts.kv_spec.dtype
        self.transfers = TransferLog()
        self._logged = TransferLog()
        self._last_log = time.monotonic()

    def execute(self, plan: StepPlan) -> list[int]:
        return self.workers.run_step(lambda: self._execute(plan))

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> list[int]:
        sampling_prefills = [op.seq for op in plan.prefills if op.samples]
        if plan.prefills:
            inp = self.prefill_inputs.prepare(StepPlan(plan.step_id, prefills=plan.prefills))
            src = [i for t in plan.kv_transfers for i in t.block_ids]
            self.channel.send(CMD_PREFILL, PrefillStep(self.prefill_pool.take_events(), inp, src))
        # The decode step runs here while rank 1 prefills.
        decoded: list[int] = []
        if plan.decodes:
            decoded = self.decode_runner.execute(StepPlan(plan.step_id, decodes=plan.decodes))
        first: list[int] = []
        if sampling_prefills:
            hidden = torch.empty((len(sampling_prefills), self.hidden_size), dtype=self.dtype,
                                 device=self.parts.device)
            self.comm.broadcast(hidden, src=PREFILL_RANK)
            first = self._sample(hidden, sampling_prefills)
        if plan.kv_transfers:
            self._receive(plan.kv_transfers)
        return first + decoded

    def _sample(self, hidden: torch.Tensor, seqs: list[SequenceState]) -> list[int]:
        r = self.prefill_inputs
        return r.sample(r.compute_logits(hidden), seqs).tolist()  # type: ignore[no-any-return]

    def _receive(self, transfers: list[KVTransferOp]) -> None:
        dst = [i for t in transfers for i in t.dst_block_ids]
        t0 = time.perf_counter()
        self.comm.recv_kv_blocks(self.parts.kv, dst, src=PREFILL_RANK)
        self.parts.platform.synchronize()
        seconds = time.perf_counter() - t0
        nbytes = len(dst) * self.parts.kv_spec.bytes_per_block
        # End to end and device-synchronised, next to the backend's own per-call numbers.
        self.comm.get_bandwidth_stats().record("kv_transfer", nbytes, seconds)
        log = self.transfers
        log.num_blocks += len(dst)
        log.num_bytes += nbytes
        log.seconds += seconds
        log.num_transfers += len(transfers)
        logger.debug("KV transfer of %s: %d blocks, %.2f MiB in %.2f ms (%.2f GB/s)",
                     ", ".join(t.request_id for t in transfers), len(dst), nbytes / 2**20,
                     seconds * 1e3, nbytes / seconds / 1e9 if seconds > 0 else 0.0)
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            done = TransferLog(log.num_blocks - self._logged.num_blocks,
                               log.num_bytes - self._logged.num_bytes,
                               log.seconds - self._logged.seconds,
                               log.num_transfers - self._logged.num_transfers)
            logger.info("KV transfer prefill -> decode: %d prompts, %.1f MiB at %.2f GB/s "
                        "(total %.1f MiB, %.2f GB/s)", done.num_transfers, done.num_bytes / 2**20,
                        done.gbps, log.num_bytes / 2**20, log.gbps)
            self._logged = TransferLog(log.num_blocks, log.num_bytes, log.seconds, log.num_transfers)
            self._last_log = now

    def prefill_pool_usage(self) -> tuple[int, int]:
        """(blocks held, blocks total) as the prefill worker itself counts them."""
        def ask() -> tuple[int, int]:
            self.channel.send(CMD_STATS, PoolEvents(self.prefill_pool.take_events()))
            reply = torch.zeros(2, dtype=torch.int64, device=self.comm.device)
            held, total = self.comm.broadcast(reply, src=PREFILL_RANK).tolist()
            return int(held), int(total)

        return self.workers.run_step(ask)


def _kv_signature(spec: KVCacheSpec, num_blocks: int, hidden_size: int) -> list[int]:
    elem = torch.tensor([], dtype=spec.dtype).element_size()
    return [num_blocks, spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, elem,
            hidden_size]


class DisaggLayout(Layout):
    """Rank 0 as the decode worker and the scheduler of a prefill/decode pair."""

    #: The prefill worker sends back only the last prompt position's hidden state, and forked
    #: choices would share blocks across the two pools.
    unsupported_params = frozenset({"n", "prompt_logprobs"})

    def __init__(self, workers: WorkerGroup) -> None:
        super().__init__(workers.config, workers.tp, workers)
        self.group = workers
        self.prefill_pool: RemoteBlockPool | None = None

    def make_scheduler(self, parts: EngineParts) -> DisaggScheduler:
        """Check that both workers' KV layouts agree, then book the prefill pool here."""
        workers = self.group
        hidden = int(parts.loaded.hf_config.hidden_size)  # type: ignore[attr-defined]
        mine = _kv_signature(parts.kv_spec, 0, hidden)
        theirs = torch.zeros(len(mine), dtype=torch.int64, device=workers.comm.device)
        got = workers.run_step(lambda: workers.comm.broadcast(theirs, src=PREFILL_RANK).tolist())
        if got[1:] != mine[1:]:
            workers.shutdown()
            raise ValueError(f"the prefill worker's KV layout {got[1:]} differs from the decode "
                             f"worker's {mine[1:]} (layers, block size, KV heads, head dim, bytes, "
                             f"hidden)")
        self.prefill_pool = RemoteBlockPool(parts.kv_spec, int(got[0]))
        cfg = parts.config
        return DisaggScheduler(parts.block_manager, BlockManager(self.prefill_pool, cfg.block_size),
                               cfg.max_num_seqs, cfg.max_num_batched_tokens,
                               cfg.max_prefill_tokens or cfg.max_num_batched_tokens)

    def make_runner(self, parts: EngineParts, scheduler: Scheduler) -> DisaggRunner:
        assert self.prefill_pool is not None, "make_scheduler runs first"
        self.group.attached = True
        logger.info("prefill/decode disaggregation: prefill worker pool %d blocks, decode pool "
                    "%d blocks", self.prefill_pool.num_blocks, parts.kv.num_blocks)
        return DisaggRunner(parts, self.group, parts.make_model_runner(), self.prefill_pool)


# --------------------------------------------------------------------------------------------
# The prefill worker (rank 1)
# --------------------------------------------------------------------------------------------


def _apply_events(held: bytearray, events: list[int]) -> None:
    for e in events:
        i = e if e >= 0 else -e - 1
        want = 0 if e >= 0 else 1
        if held[i] != want:
            raise RuntimeError(f"prefill pool out of sync: block {i} "
                               f"{'already held' if e >= 0 else 'not held'}")
        held[i] = 1 - want


@torch.inference_mode()
def serve_prefill(parts: EngineParts, comm: CommBackend) -> None:
    """The prefill worker's loop: prefill what rank 0 sends, return hidden rows and KV blocks."""
    kv = parts.kv
    runner = ModelRunner(parts.runner_context())
    hidden_size = int(parts.loaded.hf_config.hidden_size)  # type: ignore[attr-defined]
    comm.broadcast(torch.tensor(_kv_signature(parts.kv_spec, kv.num_blocks, hidden_size),
                                dtype=torch.int64, device=comm.device), src=PREFILL_RANK)
    channel = Channel(comm, src=DECODE_RANK)
    held = bytearray(kv.num_blocks)
    bs = parts.config.block_size
    while True:
        command, msg = channel.recv()
        if command == CMD_SHUTDOWN:
            break
        if command == CMD_STATS:
            _apply_events(held, msg.pool_events)
            comm.broadcast(torch.tensor([sum(held), kv.num_blocks], dtype=torch.int64,
                                        device=comm.device), src=PREFILL_RANK)
            continue
        if command != CMD_PREFILL:
            raise RuntimeError(f"unexpected command {command} on the prefill worker")
        _apply_events(held, msg.pool_events)
        written = (msg.inp.attn_metadata.slot_mapping // bs).unique().tolist()
        if any(not held[b] for b in written):
            raise RuntimeError("the prefill step writes KV blocks the prefill worker does not hold")
        hidden = runner.forward(msg.inp)
        if hidden.shape[0]:
            comm.broadcast(hidden.contiguous(), src=PREFILL_RANK)
        if msg.transfer_block_ids:
            comm.send_kv_blocks(kv, msg.transfer_block_ids, dst=DECODE_RANK)
    sent = comm.get_bandwidth_stats().as_dict().get("send_kv_blocks")
    if sent:
        logger.info("prefill worker sent %.1f MiB of KV in %d transfers (%.2f GB/s)",
                    sent["bytes"] / 2**20, sent["calls"], sent["gbps"])
