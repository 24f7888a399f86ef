"""The scheduler IR: one step of work, as an explicit, inspectable plan.

The scheduler emits a :class:`StepPlan`; the model runner executes it. Prefill and decode are
distinct op kinds with their own budgets, so a plan can be split between a prefill worker and a
decode worker (``KVTransferOp`` moves the finished prompt's blocks between them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm.engine.sequence import SequenceState


@dataclass
class PrefillOp:
    """Compute tokens ``[start, end)`` of ``seq``; sample after if ``end`` is its last token."""

    seq: SequenceState
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass
class DecodeOp:
    """Compute ``seq``'s last token and sample the next one."""

    seq: SequenceState

    @property
    def position(self) -> int:
        return self.seq.num_tokens - 1


@dataclass
class KVTransferOp:
    """Move ``block_ids`` of ``request_id`` from rank ``src`` to rank ``dst``.

    ``dst_block_ids`` are the blocks reserved for them on ``dst`` (same count, same order).
    """

    request_id: str
    block_ids: list[int]
    src: int
    dst: int
    dst_block_ids: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    step_id: int
    prefills: list[PrefillOp] = field(default_factory=list)
    decodes: list[DecodeOp] = field(default_factory=list)
    #: Requests preempted (blocks freed, back to waiting) while building this plan.
    preempted: list[str] = field(default_factory=list)
    kv_transfers: list[KVTransferOp] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(op.num_tokens for op in self.prefills)

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def without(self, request_ids: set[str]) -> StepPlan:
        """This plan less the ops of ``request_ids`` (failed or ended sequences)."""
        return StepPlan(
            step_id=self.step_id,
            prefills=[op for op in self.prefills if op.seq.request_id not in request_ids],
            decodes=[op for op in self.decodes if op.seq.request_id not in request_ids],
            preempted=self.preempted,
            kv_transfers=[t for t in self.kv_transfers if t.request_id not in request_ids],
        )

    def sampling_seqs(self) -> list[SequenceState]:
        """Sequences that get a new token from this step, in batch order."""
        return [op.seq for op in self.prefills if op.samples] + [op.seq for op in self.decodes]

    def describe(self) -> str:
        """One log line: what was prefilled, what decoded, what was preempted."""
        pre = ", ".join(f"{op.seq.request_id}[{op.start}:{op.end}]" for op in self.prefills)
        dec = ", ".join(op.seq.request_id for op in self.decodes[:8])
        if len(self.decodes) > 8:
            dec += f", +{len(self.decodes) - 8}"
        parts = [f"step {self.step_id}: prefill {self.num_prefill_tokens} tok ({pre or '-'})",
                 f"decode {self.num_decode_tokens} ({dec or '-'})"]
        if self.preempted:
            parts.append(f"preempted {', '.join(self.preempted)}")
        if self.kv_transfers:
            parts.append(f"transfer {len(self.kv_transfers)}")
        return "; ".join(parts)
