"""Executes a step plan: builds the flat batch and attention metadata, runs the model, samples.

:class:`ModelRunner` is part of the backend contract (exported by :mod:`sagellm.runner`): a
backend may subclass it and return the subclass from ``Platform.make_model_runner``. The public
methods below are the hooks such a subclass builds on; ``execute`` is what the engine calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from sagellm.engine import request_logits
from sagellm.engine.constraint import apply_token_bitmask
from sagellm.engine.mask_fill import BitmaskPool, MaskFill, begin_mask_fill
from sagellm.engine.plan import StepPlan
from sagellm.engine.runner_context import RunnerContext
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch, patch_pending, pending_rows
from sagellm.engine.token_count_cache import TokenCountCache
from sagellm.layers.attention import ForwardContext
from sagellm.layers.logits_processors import apply_penalties
from sagellm.layers.sampler import Sampler, SamplingBatch
from sagellm.layers.step_tensors import RepeatedStepTensor, step_tensor
from sagellm.protocols import AttentionMetadata, DecodeMetadata, PrefillMetadata


@dataclass
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    #: Rows of the model output whose logits are needed: first ``num_prompt_logits`` rows for
    #: prompt logprobs (``request_logits.prompt_logit_spans`` order), then the rows that
    #: sample, in ``plan.sampling_seqs()`` order.
    logits_indices: torch.Tensor
    num_prompt_logits: int = 0


class StepRunner(Protocol):
    """What the engine calls each step: a :class:`ModelRunner`, or a multi-rank runner that
    drives other ranks (``sagellm.distributed``)."""

    def execute(self, plan: StepPlan) -> list[int]:
        """Run ``plan``; one sampled token per ``plan.sampling_seqs()`` entry, in that order."""
        ...


def _block_table_tensor(seqs: list[SequenceState], device: torch.device, width: int | None = None
                        ) -> torch.Tensor:
    width = width or max((len(s.block_table) for s in seqs), default=1) or 1
    table = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        table[i, : len(s.block_table)] = s.block_table
    return torch.from_numpy(table).to(device, non_blocking=True)


class ModelRunner:
    """Core's runner: every step eagerly, on any platform.

    Built from a :class:`RunnerContext`; its fields are also attributes of the runner
    (``model``, ``kv``, ``attention``, ``platform``, ``config``, ``device``, ``block_size``,
    ``max_model_len``), plus ``sampler``, core's :class:`~sagellm.layers.sampler.Sampler`.
    """

    def __init__(self, ctx: RunnerContext) -> None:
        self.ctx = ctx
        self.model, self.kv, self.attention = ctx.model, ctx.kv, ctx.attention
        self.platform, self.config, self.device = ctx.platform, ctx.config, ctx.device
        self.block_size, self.max_model_len = ctx.block_size, ctx.max_model_len
        self.sampler = Sampler()
        #: Penalised rows' token counts, carried between steps (a cache, checked on use).
        self.token_counts = TokenCountCache()
        #: Their penalty values, kept on the device while the batch keeps them.
        self.penalty_settings = RepeatedStepTensor()
        #: The reused host buffers of the structured-output masks.
        self.bitmasks = BitmaskPool(self.platform)
        #: The width of the logits the runner samples from, known after the first sampling
        #: (a subclass that knows it earlier may set it); sizes the masks begun before them.
        self.logits_width: int | None = None

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        return self.platform.to_device(torch.from_numpy(arr))

    # -- inputs ----------------------------------------------------------------------------

    def prepare(self, plan: StepPlan, prev: StepLaunch | None = None) -> ModelInput:
        """The flat batch of ``plan`` on the device: prefill tokens first, then decodes.

        A sequence whose last token is still :data:`~sagellm.engine.step_launch.PENDING_TOKEN`
        (sampled by ``prev``, the step queued before this one, not yet on the host) gets that
        input from ``prev``'s ids on the device."""
        bs = self.block_size
        pending: list[int] = []
        owners: list[SequenceState] = []
        ids: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        logits_idx: list[int] = []
        prompt_idx: list[int] = []
        prefill = None
        offset = 0
        if plan.prefills:
            cu = [0]
            seq_lens, ctx_lens = [], []
            for op in plan.prefills:
                seq = op.seq
                if seq.needs_prompt_logits:
                    first, count = request_logits.prompt_logit_span(op)
                    prompt_idx.extend(range(offset + first - op.start,
                                            offset + first - op.start + count))
                p = np.arange(op.start, op.end, dtype=np.int64)
                table = np.asarray(seq.block_table, dtype=np.int64)
                ids.append(np.asarray(seq.token_ids[op.start:op.end], dtype=np.int64))
                if op.end == seq.num_tokens and seq.token_ids[-1] == PENDING_TOKEN:
                    pending.append(offset + op.num_tokens - 1)
                    owners.append(seq)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                offset += op.num_tokens
                cu.append(offset)
                seq_lens.append(op.end)
                ctx_lens.append(op.start)
                if op.samples:
                    logits_idx.append(offset - 1)
            prefill = PrefillMetadata(
                cu_seqlens_q=self._to_device(np.asarray(cu, dtype=np.int32)),
                seq_lens=self._to_device(np.asarray(seq_lens, dtype=np.int32)),
                context_lens=self._to_device(np.asarray(ctx_lens, dtype=np.int32)),
                block_tables=_block_table_tensor([op.seq for op in plan.prefills], self.device),
                max_seqlen_q=max(op.num_tokens for op in plan.prefills),
                max_seqlen_k=max(seq_lens),
                has_prefix=any(c > 0 for c in ctx_lens),
                seq_lens_list=seq_lens,
                context_lens_list=ctx_lens,
            )
        decode = None
        if plan.decodes:
            seqs = [op.seq for op in plan.decodes]
            n = len(seqs)
            last = [len(s.token_ids) - 1 for s in seqs]
            dpos = np.array(last, dtype=np.int64)
            last_blocks = np.array([s.block_table[p // bs] for s, p in zip(seqs, last)],
                                   dtype=np.int64)
            last_ids = [s.token_ids[-1] for s in seqs]
            ids.append(np.array(last_ids, dtype=np.int64))
            for i in pending_rows(last_ids):
                pending.append(offset + i)
                owners.append(seqs[i])
            pos.append(dpos)
            slots.append(last_blocks * bs + dpos % bs)
            logits_idx.extend(range(offset, offset + n))
            decode = DecodeMetadata(
                seq_lens=self._to_device((dpos + 1).astype(np.int32)),
                block_tables=_block_table_tensor(seqs, self.device),
                max_seq_len=int(dpos.max()) + 1,
            )
        meta = AttentionMetadata(
            num_prefill_tokens=plan.num_prefill_tokens,
            num_decode_tokens=plan.num_decode_tokens,
            slot_mapping=self._to_device(np.concatenate(slots)),
            prefill=prefill,
            decode=decode,
        )
        input_ids = self._to_device(np.concatenate(ids))
        patch_pending(input_ids, pending, owners, prev)
        return ModelInput(
            input_ids=input_ids,
            positions=self._to_device(np.concatenate(pos)),
            attn_metadata=meta,
            logits_indices=self._to_device(np.asarray(prompt_idx + logits_idx, dtype=np.int64)),
            num_prompt_logits=len(prompt_idx),
        )

    def sampling_batch(self, seqs: list[SequenceState]) -> SamplingBatch:
        """Per-row sampling settings of ``seqs``; creates the generators of seeded requests."""
        gens: list[torch.Generator | None] = []
        for s in seqs:
            seed = s.seed
            if seed is not None and s.generator is None and s.params.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(seed)
                s.generator = g
            gens.append(s.generator)
        min_ps = [s.params.min_p for s in seqs]
        return SamplingBatch(
            temperatures=[s.params.temperature for s in seqs],
            top_ks=[s.params.top_k for s in seqs],
            top_ps=[s.params.top_p for s in seqs],
            generators=gens,
            min_ps=min_ps if any(min_ps) else None,
        )

    # -- execution -------------------------------------------------------------------------

    def forward_context(self, meta: AttentionMetadata) -> ForwardContext:
        """What the model's attention layers receive for one forward over ``meta``."""
        return ForwardContext(meta, self.kv.kv_caches(), self.attention)

    def forward(self, inp: ModelInput) -> torch.Tensor:
        """Run the model; returns the hidden states of the rows whose logits are needed
        (``inp.logits_indices``: prompt-logprob rows, then the rows that sample)."""
        hidden = self.model(inp.input_ids, inp.positions, self.forward_context(inp.attn_metadata))
        return hidden[inp.logits_indices]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the hidden rows ``hidden``."""
        return self.model.compute_logits(hidden).float()  # type: ignore[operator,no-any-return]

    def sample(self, logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
        """One token id per row of ``logits`` (row ``i`` belongs to ``seqs[i]``), on the device.

        Changes ``logits`` in place first: the structured-output masks, :meth:`suppress_early_stop`,
        penalties and logit bias (``sagellm.engine.request_logits``). Rows that ask for
        logprobs get them from the logits as they came in (``seq.sampled_logprob``); other rows
        pay nothing for them. Waits for the device when a row asks for logprobs; the runner's
        own steps use :meth:`sample_tokens` and :meth:`fetch_sampled`, which never wait before
        the step's one fetch.
        """
        ids, logprobs = self.sample_tokens(logits, seqs)
        if logprobs is not None:
            logprobs.record(logprobs.tensors.pack().tolist(), seqs)
        return ids

    def sample_tokens(self, logits: torch.Tensor, seqs: list[SequenceState], *,
                      mask_fill: MaskFill | None = None, prev: StepLaunch | None = None
                      ) -> tuple[torch.Tensor, request_logits.SampledLogprobs | None]:
        """:meth:`sample` without waiting for the device: the ids and, if any row asks for
        them, their logprobs, both still on the device (hand them to :meth:`fetch_sampled`).

        ``mask_fill``: the masks :meth:`begin_mask_fill` started for these rows before the
        forward (checked to be theirs); without it they are filled here. ``prev``: the step
        queued before, whose ids give the penalised rows' pending tokens. Queues nothing that
        waits, so host work here overlaps the forward the device is still running."""
        self.logits_width = logits.shape[-1]
        raw = request_logits.raw_logprobs(logits, seqs)
        request_logits.apply_constraints(logits, seqs, self.bitmasks, fill=mask_fill,
                                         apply=self.apply_token_bitmask,
                                         device_wait=self.queue_mask_wait)
        self.suppress_early_stop(logits, seqs)
        request_logits.apply_penalties_and_bias(logits, seqs, self.token_counts,
                                                 self.penalty_settings, self.apply_penalties,
                                                 prev)
        ids = self.sampler(logits, self.sampling_batch(seqs))
        if raw is None:
            return ids, None
        return ids, request_logits.sampled_logprobs(raw, ids, seqs, self.platform.logprobs)

    def fetch_sampled(self, ids: torch.Tensor, logprobs: request_logits.SampledLogprobs | None,
                      seqs: list[SequenceState]) -> list[int]:
        """:meth:`fetch_ids` of ``ids``, the step's one wait; the logprobs ride in the same copy
        (appended to the ids) and are set on ``seqs``."""
        return self.fetch_later(seqs, ids, [] if logprobs is None else [(logprobs, seqs)]
                                ).result()

    def fetch_later(self, seqs: list[SequenceState], ids: torch.Tensor,
                    logprobs: list[tuple[request_logits.SampledLogprobs, list[SequenceState]]]
                    = []) -> StepLaunch:  # noqa: B006 - never mutated
        """The queued step whose rows ``seqs`` sampled ``ids`` (on the device): the copy of the
        ids to the host starts now (``Platform.start_fetch``) and :meth:`StepLaunch.result`
        waits for it. Each ``(logprobs, rows)`` pair's values ride in the same copy, appended
        to the ids, and are set on its ``rows`` when the result comes."""
        if not logprobs:
            return StepLaunch(seqs, ids, self.platform.start_fetch(ids))
        n = ids.shape[0]
        packed = [lp.tensors.pack() for lp, _ in logprobs]
        wait = self.platform.start_fetch(torch.cat([ids.to(torch.int64), *packed]))

        def result() -> list[int]:
            values = wait()
            start = n
            for (lp, rows), p in zip(logprobs, packed, strict=True):
                lp.record(values[start:start + p.shape[0]], rows)
                start += p.shape[0]
            return values[:n]

        return StepLaunch(seqs, ids, result)

    def begin_mask_fill(self, seqs: list[SequenceState], prev: StepLaunch | None = None
                        ) -> MaskFill | None:
        """Start the structured-output masks of the rows ``seqs`` that are about to sample, on
        a worker thread, before their forward is queued; ``None`` when no row has a
        constraint (or the logits' width is not known yet: :meth:`sample_tokens` then fills).

        The caller passes the result to :meth:`sample_tokens` for these rows and, whatever
        happens, joins it before the step ends (``with fill:`` or ``fill.join()``)."""
        if self.logits_width is None:
            return None
        return begin_mask_fill(self.bitmasks, seqs, self.logits_width, prev)

    def queue_mask_wait(self, flag: torch.Tensor, value: int) -> bool:
        """Queue on the device a wait until the page-locked int32 word ``flag`` (host memory)
        reaches ``value`` (a cyclic 32-bit comparison: ``(int32)(flag - value) >= 0``), so that
        the work queued after it (the copy of a structured-output mask the mask-fill worker is
        still writing) runs only then, and the host need not wait for the worker; ``False``
        when it cannot, and the host waits. Core's version: ``False``. A backend whose device
        can wait on host memory (CUDA's ``cuStreamWaitValue32``) returns ``True``."""
        return False

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor | None) -> None:
        """Set to ``-inf``, in place, the logits ``[R, V]`` the packed int32 ``bitmask``
        ``[N, words]`` (host) disallows; row ``i`` applies to logits row ``rows[i]`` (``None``:
        row ``i``). Core's torch version; a backend's runner may use its own kernel."""
        apply_token_bitmask(logits, bitmask, rows)

    def apply_penalties(self, logits: torch.Tensor, rows: torch.Tensor | None,
                        counts: torch.Tensor, seen: torch.Tensor | None, presence: torch.Tensor,
                        frequency: torch.Tensor, repetition: torch.Tensor | None) -> None:
        """Presence, frequency and repetition penalties on the logits of ``rows``, in place
        (:func:`sagellm.layers.logits_processors.apply_penalties`, whose arguments these are).
        Core's torch version; a backend's runner may use its own kernel."""
        apply_penalties(logits, rows, counts, seen, presence, frequency, repetition)

    @staticmethod
    def argmax_suffices(seqs: list[SequenceState]) -> bool:
        """Whether every row's token is the argmax of its raw logits and no row asks for
        logprobs (a runner may then skip :meth:`sample`, as a CUDA graph ending in an argmax
        does)."""
        return all(s.params.argmax_suffices and s.constraint is None for s in seqs)

    @staticmethod
    def argmax_is_token(seqs: list[SequenceState]) -> bool:
        """Whether every row's token is the argmax of its raw logits, logprobs or not (a runner
        may then skip :meth:`sample` and take the rows' logprobs from :meth:`argmax_logprobs`)."""
        return all(s.params.argmax_is_token and s.constraint is None for s in seqs)

    def argmax_logprobs(self, logits: torch.Tensor, ids: torch.Tensor, seqs: list[SequenceState]
                        ) -> request_logits.SampledLogprobs | None:
        """:meth:`sample_tokens`'s logprobs for rows where :meth:`argmax_is_token` holds and
        ``ids`` are the argmax of ``logits`` (any float dtype; nothing changes them, so rows
        are read in place where all ask); ``None`` if no row asks. Hand them to
        :meth:`fetch_sampled` with ``ids``."""
        raw = request_logits.raw_logprobs(logits, seqs, copy=False)
        if raw is None:
            return None
        return request_logits.sampled_logprobs(raw, ids, seqs, self.platform.logprobs)

    def fetch_ids(self, ids: torch.Tensor) -> list[int]:
        """Sampled ids to the host: the step's wait for the device (``Platform.fetch_ids``)."""
        return self.platform.fetch_ids(ids)

    def execute(self, plan: StepPlan) -> list[int]:
        """Run one step; returns one sampled token per ``plan.sampling_seqs()`` entry
        (:meth:`launch`, then its result).

        The engine may call it again with a part of a plan that raised (one sequence at a time,
        nothing committed in between), so it must not keep per-plan state across calls.
        """
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: StepLaunch | None = None) -> StepLaunch:
        """Queue one step on the device and start the copy of its sampled ids to the host;
        returns without waiting for them (:meth:`StepLaunch.result` waits).

        ``prev``: the step queued just before, whose tokens are not on the host yet; inputs
        that are :data:`~sagellm.engine.step_launch.PENDING_TOKEN` come from its ids (the
        engine's asynchronous scheduling). A runner subclass that overrides :meth:`execute`
        instead of this runs synchronously, as before."""
        seqs = plan.sampling_seqs()
        fill = self.begin_mask_fill(seqs, prev)
        try:
            inp = self.prepare(plan) if prev is None else self.prepare(plan, prev)
            hidden = self.forward(inp)
            if not inp.logits_indices.numel():
                return StepLaunch.done([], [])
            logits = self.compute_logits(hidden)
            if inp.num_prompt_logits:
                request_logits.record_prompt_logprobs(logits[: inp.num_prompt_logits], plan,
                                                      self.platform.logprobs)
                logits = logits[inp.num_prompt_logits:]
            if not seqs:
                return StepLaunch.done([], [])
            ids, logprobs = self.sample_tokens(logits, seqs, mask_fill=fill, prev=prev)
            return self.fetch_later(seqs, ids, [] if logprobs is None else [(logprobs, seqs)])
        finally:
            if fill is not None:
                fill.join()

    @staticmethod
    def suppress_early_stop(logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        """Ban, in place, the stop and end-of-sequence ids of rows still short of ``min_tokens``
        (one indexed write for the whole batch).

        Runs after the structured-output masks: a row whose grammar allows nothing but a stop
        or end-of-sequence token keeps those (the grammar wins over ``min_tokens``; banning them
        would leave the row nothing to sample). Decided on the device, without a wait."""
        vocab = logits.shape[-1]
        rows: list[int] = []
        ids: list[int] = []
        for i, s in enumerate(seqs):
            if s.params.min_tokens and s.num_output_tokens < s.params.min_tokens:
                banned = set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    banned |= s.eos_token_ids
                # An id past the vocabulary can never be sampled, so there is nothing to ban.
                kept = [t for t in banned if t < vocab]
                rows.extend([i] * len(kept))
                ids.extend(kept)
        if rows:
            dev = logits.device
            index = (step_tensor(rows, torch.int64, dev), step_tensor(ids, torch.int64, dev))
            constrained = any(seqs[i].constraint is not None for i in set(rows))
            kept_values = logits[index] if constrained else None
            logits.index_put_(index, logits.new_full((), float("-inf")))
            if kept_values is not None:
                emptied = torch.isneginf(logits).all(-1)
                logits.index_put_(index, torch.where(emptied[index[0]], kept_values,
                                                     float("-inf")))
