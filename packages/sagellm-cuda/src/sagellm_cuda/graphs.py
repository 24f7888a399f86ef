"""A model runner that replays decode steps as CUDA graphs, greedy sampling included.

At start-up one graph is captured per padded batch size (1, 2, 4, 8, then multiples of 16 up to
``max_num_seqs``); all graphs share one memory pool and read their inputs from one static int32
buffer: token ids, positions, KV slots, context lengths and a block table as wide as
``max_model_len`` needs. A decode step then costs one host-to-device copy of that buffer (filled in
one of two pinned host twins, used in turn, each written again only after its last copy ran: with
asynchronous scheduling the host stages step N+1 while step N's copy may still be queued behind
N's prefill replay), one graph launch and one device-to-host copy of the sampled ids, which is the only
synchronisation. The graph ends in the LM head and an argmax, so greedy requests never move
logits. It also leaves its logits in a static buffer: rows with other settings (sampling,
penalties, logit bias, logprobs, a grammar) run core's ``sample_tokens`` on those rows of it,
not on a second LM head, while the other rows keep the graph's argmax; their host work (the
grammar masks above all) runs while the graph does, and their logprobs come back in the
ids' copy (``fetch_sampled``). When the only extra is logprobs on greedy rows, the graph's argmax
stays every row's token and the logprobs come from the buffer as it is (``argmax_logprobs``,
the platform's ``logprobs`` op: two Triton launches on the GPU).

A step whose only prefill is one prompt's last part (the common case of a request arriving
alone: it decides time to first token) replays a prefill graph captured for the next token
bucket (32 ... 2048): the whole prompt, or the tokens after its cached prefix (a prefix-cache
hit, or the last chunk of a chunked prompt). The graph reads the cached length from its staging
buffer, so one graph per bucket serves both. The tokens are padded at their end; causal
attention keeps the padding out of the real rows, padded rows write no KV (slot -1), and the
graph returns the last real row. Other steps with prefill tokens run eagerly through core's
:class:`ModelRunner`.

Built only on the public runner contract (:mod:`sagellm.runner`): the graphs call the model
through ``forward_context``, sample through ``sample_tokens`` and wait through
``fetch_sampled``, exactly as core's eager steps do.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np
import torch

from sagellm.protocols import AttentionMetadata, DecodeMetadata, DeviceEvent, PrefillMetadata
from sagellm.runner import (
    PENDING_TOKEN,
    MaskFill,
    ModelRunner,
    RunnerContext,
    SampledLogprobs,
    SequenceState,
    StepLaunch,
    StepPlan,
    patch_pending,
    pending_rows,
)
from sagellm_cuda.host_flag_wait import host_flag_wait
from sagellm_cuda.penalties_kernel import apply_penalties_triton
from sagellm_cuda.token_bitmask import apply_token_bitmask_triton
from sagellm_cuda.token_bitmask import masked_argmax as masked_argmax_triton

logger = logging.getLogger("sagellm.cuda.graphs")

#: One replay's sampled ids (on the device), their logprobs if any row asked, and those rows.
_Sampled = tuple[torch.Tensor, "SampledLogprobs | None", list[SequenceState]]

#: Prompt lengths (padded up) that get a captured single-sequence prefill graph.
PREFILL_BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] < max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class Replayable(Protocol):
    def replay(self) -> None: ...


class CudaGraphCapture:
    """The runner's only CUDA graph calls: each forward captured as a graph, all graphs in one
    memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], None]) -> Replayable:
        forward()  # compiles kernels for this shape outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            forward()
        return graph

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class CudaGraphModelRunner(ModelRunner):
    """Graphs for up to ``config.max_num_seqs`` decodes and prompts of up to
    ``min(2048, config.max_num_batched_tokens)`` tokens; none with ``config.enforce_eager``."""

    #: Builds the graphs (CPU tests substitute a capture whose replay re-runs the forward).
    graph_capture: ClassVar[type[CudaGraphCapture]] = CudaGraphCapture

    def __init__(self, ctx: RunnerContext) -> None:
        super().__init__(ctx)
        device, block_size = self.device, self.block_size
        max_model_len = self.max_model_len
        max_batch_size = self.max_batch_size = ctx.config.max_num_seqs
        enforce_eager = self.enforce_eager = ctx.config.enforce_eager
        max_prefill_graph_tokens = min(2048, ctx.config.max_num_batched_tokens)
        self.graph_sizes = graph_batch_sizes(max_batch_size)
        self.graphs: dict[int, Replayable] = {}
        self.capture_seconds = 0.0
        self.num_graph_steps = 0
        self.num_eager_steps = 0
        mb = max(self.graph_sizes)
        self.table_width = -(-max_model_len // block_size)
        pin = device.type == "cuda"  # page-locked host twins on the GPU (CPU tests have none)
        #: The device's wait for a mask fill's flag (``queue_mask_wait``), where it has one.
        self._mask_wait = host_flag_wait(device)
        # One int32 staging buffer on the device, filled from page-locked host twins:
        # [ids | positions | slots | seq_lens] each mb long, then the block table mb x width.
        # Two host twins, used in turn (``_next_host``): with asynchronous scheduling the host
        # stages step N+1 while step N's copy may still wait behind N's prefill replay.
        n = 4 * mb + mb * self.table_width
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._hosts = HostTwins(n, pin)
        self._host, self._np = self._hosts.tensors[0], self._hosts.arrays[0]
        self._mb = mb
        #: What each row of a staging block table holds: ``(the block_table list written
        #: there, its num_released_blocks then, entries written)`` (``_fill_table_row``); one
        #: list per host twin, ``_table_rows`` the current one's.
        self._host_rows: list[list[tuple[list[int], int, int] | None]] = [[None] * mb,
                                                                          [None] * mb]
        self._table_rows = self._host_rows[0]
        self.out_ids = torch.zeros(mb, dtype=torch.int64, device=device)
        #: The graphs' logits ([mb, vocab] and [1, vocab], the LM head's dtype), made by the
        #: first forward, which runs before any capture.
        self.out_logits: torch.Tensor | None = None
        self.prefill_out_logits: torch.Tensor | None = None
        # Single-sequence prefill graphs: [ids | positions | slots] each pt long, the block
        # table row, then the index of the last real token, the cached length (the first new
        # token's position) and the context length after the padded tokens.
        self.prefill_sizes = [b for b in PREFILL_BUCKETS
                              if b <= min(max_prefill_graph_tokens, max_model_len)]
        self.prefill_graphs: dict[int, Replayable] = {}
        self.num_prefill_graph_steps = 0
        pt = self._pt = max(self.prefill_sizes, default=0)
        pn = 3 * pt + self.table_width + 3
        self._pdev = torch.zeros(pn, dtype=torch.int32, device=device)
        self._phosts = HostTwins(pn, pin)
        self._pcu = {b: torch.tensor([0, b], dtype=torch.int32, device=device)
                     for b in self.prefill_sizes}
        self.prefill_out_ids = torch.zeros(1, dtype=torch.int64, device=device)
        if not enforce_eager:
            self.capture()
        if self.out_logits is not None:  # a capture's warm-up made it (a CPU test's may not)
            self.logits_width = self.out_logits.shape[1]
        # Everything built so far (model, tokenizer, graphs) lives as long as the engine: move it
        # out of the cyclic collector's sight, so that full collections during serving do not
        # rescan it (they cost milliseconds per request right after start-up).
        gc.collect()
        gc.freeze()

    # -- views into the staging buffers ----------------------------------------------------

    def _views(self, buf: torch.Tensor | np.ndarray, bs: int):  # type: ignore[no-untyped-def]
        mb, w = self._mb, self.table_width
        return (buf[0:bs], buf[mb:mb + bs], buf[2 * mb:2 * mb + bs], buf[3 * mb:3 * mb + bs],
                buf[4 * mb:4 * mb + bs * w].reshape(bs, w))

    def _static_forward(self, bs: int) -> None:
        ids, pos, slots, seq_lens, tables = self._views(self._dev, bs)
        meta = AttentionMetadata(
            num_prefill_tokens=0, num_decode_tokens=bs, slot_mapping=slots, prefill=None,
            decode=DecodeMetadata(seq_lens=seq_lens, block_tables=tables,
                                  max_seq_len=self.max_model_len))
        hidden = self.model(ids, pos, self.forward_context(meta))
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        self.out_ids[:bs].copy_(logits.argmax(-1))
        self.out_logits = self._logits_buffer(self.out_logits, self._mb, logits)
        self.out_logits[:bs].copy_(logits)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        mb = self._mb
        # Padding rows: one token of context, nothing written.
        self._dev[3 * mb:4 * mb].fill_(1)
        self._dev[2 * mb:3 * mb].fill_(-1)
        for host in self._hosts.arrays:
            host[3 * mb:4 * mb] = 1
            host[2 * mb:3 * mb] = -1
        capture = self.graph_capture(self.device)
        for bs in reversed(self.graph_sizes):
            self.graphs[bs] = capture.capture(functools.partial(self._static_forward, bs))
        for tb in reversed(self.prefill_sizes):
            *_, seq_len = self._pviews(self._pdev, tb)
            seq_len.fill_(tb)  # the capture's own run: no cached prefix
            self.prefill_graphs[tb] = capture.capture(functools.partial(self._static_prefill, tb))
        capture.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d decode graphs (batch %d..%d) and %d prefill graphs (up to %d "
                    "tokens) in %.2f s", len(self.graphs), self.graph_sizes[0],
                    self.graph_sizes[-1], len(self.prefill_graphs), self._pt, self.capture_seconds)

    # -- single-sequence prefill graphs ----------------------------------------------------

    def _pviews(self, buf: torch.Tensor | np.ndarray, tb: int):  # type: ignore[no-untyped-def]
        """``(ids, positions, slots, block table [1, w], last row, cached length, context
        length)`` of the prefill staging buffer for bucket ``tb``."""
        pt, w = self._pt, self.table_width
        e = 3 * pt + w
        return (buf[0:tb], buf[pt:pt + tb], buf[2 * pt:2 * pt + tb],
                buf[3 * pt:e].reshape(1, w), buf[e:e + 1], buf[e + 1:e + 2], buf[e + 2:e + 3])

    def _static_prefill(self, tb: int) -> None:
        ids, pos, slots, table, last, ctx, seq_len = self._pviews(self._pdev, tb)
        # The cached length is read on the device at every replay, so the attention reads the
        # prefix from the cache (``has_prefix``); no host list: their values change per replay.
        meta = AttentionMetadata(
            num_prefill_tokens=tb, num_decode_tokens=0, slot_mapping=slots, decode=None,
            prefill=PrefillMetadata(cu_seqlens_q=self._pcu[tb], seq_lens=seq_len,
                                    context_lens=ctx, block_tables=table, max_seqlen_q=tb,
                                    max_seqlen_k=self.max_model_len, has_prefix=True))
        hidden = self.model(ids, pos, self.forward_context(meta)).index_select(0, last)
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        self.prefill_out_ids.copy_(logits.argmax(-1))
        self.prefill_out_logits = self._logits_buffer(self.prefill_out_logits, 1, logits)
        self.prefill_out_logits.copy_(logits)

    def _logits_buffer(self, buf: torch.Tensor | None, rows: int, logits: torch.Tensor
                       ) -> torch.Tensor:
        """``buf``, or a new ``[rows, vocab]`` buffer for ``logits`` (outside any capture: the
        first forward of each kind is an uncaptured warm-up)."""
        if buf is not None and buf.shape[1] == logits.shape[-1] and buf.dtype == logits.dtype:
            return buf
        if self.device.type == "cuda":
            assert not torch.cuda.is_current_stream_capturing(), "logits buffer made in a capture"
        return torch.empty(rows, logits.shape[-1], dtype=logits.dtype, device=logits.device)

    def _prefill_graph_size(self, plan: StepPlan) -> int | None:
        """The bucket for a step whose only prefill is the last part of one prompt, after a
        cached prefix or from its start (decodes may ride along). The padded tokens' positions
        must stay inside the staged block table, which the kernel indexes up to them."""
        if len(plan.prefills) != 1 or not self.prefill_graphs:
            return None
        op = plan.prefills[0]
        if not op.samples or op.seq.needs_prompt_logits:
            return None
        room = self.table_width * self.block_size - op.start
        return next((b for b in self.prefill_sizes if op.num_tokens <= b <= room), None)

    def _run_prefill_graph(self, plan: StepPlan, tb: int, fill: MaskFill | None,
                           prev: StepLaunch | None) -> _Sampled:
        op = plan.prefills[0]
        seq, start, n, block = op.seq, op.start, op.num_tokens, self.block_size
        slot = self._phosts.take()
        host = self._phosts.tensors[slot]
        ids, pos, slots, table, last, ctx, seq_len = self._pviews(self._phosts.arrays[slot], tb)
        p = np.arange(start, start + n, dtype=np.int64)
        bt = np.asarray(seq.block_table, dtype=np.int64)
        ids[:n] = seq.token_ids[start:start + n]
        pos[:n] = p
        slots[:n] = bt[p // block] * block + p % block
        ids[n:], pos[n:], slots[n:] = 0, 0, -1
        # Padded rows read keys up to their own positions: entries past the table are block 0
        # (a real block, never a stale NO_BLOCK of an earlier sequence).
        table[0, :len(bt)] = bt
        table[0, len(bt):-(-(start + tb) // block)] = 0
        last[0], ctx[0], seq_len[0] = n - 1, start, start + tb
        self._pdev.copy_(host, non_blocking=True)
        self._phosts.copied(self.platform.record_event())
        if seq.token_ids[start + n - 1] == PENDING_TOKEN:  # preempted, recomputed at once
            patch_pending(self._pdev[:tb], [n - 1], [seq], prev)
        self.prefill_graphs[tb].replay()
        self.num_prefill_graph_steps += 1
        return self._sample_from_graph([seq], self.prefill_out_ids, self.prefill_out_logits, fill,
                                       prev)

    def _padded(self, n: int) -> int | None:
        for bs in self.graph_sizes:
            if bs >= n:
                return bs
        return None

    # -- execution -------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: StepLaunch | None = None) -> StepLaunch:
        """Graphs where the step's shape allows: decodes alone, one prompt's last part alone,
        or that plus decodes (two replays: a new request joining a running batch, the common
        step of online serving). Everything else runs eagerly (core's ``launch``).
        Either way one copy brings the step's ids (and logprobs) back, and nothing waits for it
        here: inputs still pending on ``prev`` are taken from its ids on the device.

        The structured-output masks of the graph steps' rows start filling first, on a worker
        thread, so the input copies and replays overlap them (``begin_mask_fill``)."""
        n = len(plan.decodes)
        bs = self._padded(n) if (self.graphs and n) else None
        tb = self._prefill_graph_size(plan)
        if (tb is None and plan.prefills) or (n and bs is None):
            self.num_eager_steps += 1
            return super().launch(plan, prev)
        decodes = [op.seq for op in plan.decodes]
        fills = [self.begin_mask_fill([plan.prefills[0].seq], prev) if tb is not None else None,
                 self.begin_mask_fill(decodes, prev) if n else None]
        try:
            parts: list[_Sampled] = []
            if tb is not None:
                parts.append(self._run_prefill_graph(plan, tb, fills[0], prev))
            if n:
                assert bs is not None
                self.num_graph_steps += 1
                parts.append(self._run_decode_graph(decodes, bs, fills[1], prev))
            ids = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            return self.fetch_later(plan.sampling_seqs(), ids,
                                    [(lp, rows) for _, lp, rows in parts if lp is not None])
        finally:
            for fill in fills:
                if fill is not None:
                    fill.join()

    def _run_decode_graph(self, seqs: list[SequenceState], bs: int, fill: MaskFill | None,
                          prev: StepLaunch | None) -> _Sampled:
        self._next_host()
        pending = self._fill(seqs, bs)
        end = 4 * self._mb + bs * self.table_width
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._hosts.copied(self.platform.record_event())
        if pending:
            patch_pending(self._dev[:bs], pending, [seqs[i] for i in pending], prev)
        self.graphs[bs].replay()
        return self._sample_from_graph(seqs, self.out_ids, self.out_logits, fill, prev)

    def _sample_from_graph(self, seqs: list[SequenceState], out_ids: torch.Tensor,
                           out_logits: torch.Tensor | None, fill: MaskFill | None = None,
                           prev: StepLaunch | None = None) -> _Sampled:
        """Greedy ids straight from the graph (and, where greedy rows ask for logprobs and no
        row needs more, their logprobs straight from its logits); rows with other settings
        sample the graph's logits (just those rows) and replace their ids. ``fill``: the masks
        begun for the constrained rows of ``seqs`` (never the graph's argmax: greedy ones with
        nothing else to apply take the argmax over their allowed tokens, :meth:`masked_argmax`,
        the others sample). Returns the ids on the device, and the logprobs with the rows they
        are for."""
        n = len(seqs)
        if self.argmax_suffices(seqs):  # the common case, decided without a list per row
            assert fill is None, "a mask fill for rows that take the graph's argmax"
            return out_ids[:n], None, seqs
        need = [i for i, s in enumerate(seqs) if not self.argmax_suffices([s])]
        assert out_logits is not None
        sub = seqs if len(need) == n else [seqs[i] for i in need]
        if self.argmax_is_token(sub):
            # The graph's argmax is every row's token and its logits are as the model made them
            # (nothing masks or penalises them): no float copy, no second argmax.
            ids = out_ids[:n]
            return ids, self.argmax_logprobs(out_logits[:n], ids, seqs), seqs
        index = None if sub is seqs else \
            self.platform.to_device(torch.tensor(need, dtype=torch.int64))
        if fill is not None and all(s.params.argmax_suffices for s in sub):
            # Greedy rows that leave the argmax for their grammar alone: the mask goes into the
            # argmax itself (one launch, logits only read; no float copy, mask and argmax).
            try:
                sub_ids = self.masked_argmax(
                    out_logits, fill.take(seqs, out_logits.shape[1], self.queue_mask_wait), index)
            finally:
                fill.release()
            logprobs = None
        else:
            # The whole batch's buffer is rewritten by the next replay, so it may be changed in
            # place here (``.float()`` of a float32 buffer is the buffer itself).
            logits = out_logits[:n] if index is None else out_logits.index_select(0, index)
            sub_ids, logprobs = self.sample_tokens(logits.float(), sub, mask_fill=fill,
                                                   prev=prev)
        ids = sub_ids if index is None else out_ids[:n].index_copy(0, index, sub_ids)
        return ids, logprobs, sub

    def queue_mask_wait(self, flag: torch.Tensor, value: int) -> bool:
        """On the GPU: ``cuStreamWaitValue32`` on the current stream
        (:mod:`sagellm_cuda.host_flag_wait`), so the host never waits for a mask fill."""
        return self._mask_wait is not None and self._mask_wait(flag, value)

    def masked_argmax(self, logits: torch.Tensor, bitmask: torch.Tensor,
                      rows: torch.Tensor | None) -> torch.Tensor:
        """Greedy ids of the constrained rows (bitmask row ``i``: logits row ``rows[i]``, or
        ``i``) among their allowed tokens, the logits left as they are. On the GPU one Triton
        kernel (:func:`sagellm_cuda.token_bitmask.masked_argmax`); elsewhere the mask on a
        float copy, then ``argmax``."""
        if logits.is_cuda:
            return masked_argmax_triton(logits, bitmask, rows)
        picked = logits[: bitmask.shape[0]] if rows is None else logits.index_select(0, rows)
        sub = picked.to(torch.float32, copy=True)
        self.apply_token_bitmask(sub, bitmask, None)
        return sub.argmax(dim=-1)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor | None) -> None:
        """On the GPU: one Triton kernel, in place (:mod:`sagellm_cuda.token_bitmask`)."""
        if logits.is_cuda:
            apply_token_bitmask_triton(logits, bitmask, rows)
        else:
            super().apply_token_bitmask(logits, bitmask, rows)

    def apply_penalties(self, logits: torch.Tensor, rows: torch.Tensor | None,
                        counts: torch.Tensor, seen: torch.Tensor | None, presence: torch.Tensor,
                        frequency: torch.Tensor, repetition: torch.Tensor | None) -> None:
        """On the GPU: one Triton kernel, in place (:mod:`sagellm_cuda.penalties_kernel`)."""
        if logits.is_cuda:
            apply_penalties_triton(logits, rows, counts, seen, presence, frequency, repetition)
        else:
            super().apply_penalties(logits, rows, counts, seen, presence, frequency, repetition)

    def _next_host(self) -> None:
        """Make the other host twin current, once the copy that last read it has run."""
        slot = self._hosts.take()
        self._host, self._np = self._hosts.tensors[slot], self._hosts.arrays[slot]
        self._table_rows = self._host_rows[slot]

    def _fill(self, seqs: list[SequenceState], bs: int) -> list[int]:
        """Stage the decode inputs of ``seqs`` (padded to ``bs``); returns the rows whose token
        is still pending on the step queued before (``PENDING_TOKEN`` staged there)."""
        n = len(seqs)
        block = self.block_size
        ids, pos, slots, seq_lens, tables = self._views(self._np, bs)
        last = [len(s.token_ids) - 1 for s in seqs]
        p = np.array(last, dtype=np.int64)
        last_ids = [s.token_ids[-1] for s in seqs]
        ids[:n] = last_ids
        pos[:n] = p
        seq_lens[:n] = p + 1
        slots[:n] = np.array([s.block_table[q // block] for s, q in zip(seqs, last)],
                             dtype=np.int64) * block + p % block
        for i, s in enumerate(seqs):
            self._fill_table_row(tables[i], i, s)
        if bs > n:
            ids[n:] = 0
            pos[n:] = 0
            slots[n:] = -1
            seq_lens[n:] = 1
        return pending_rows(last_ids) if PENDING_TOKEN in last_ids else []

    def _fill_table_row(self, row: np.ndarray, i: int, seq: SequenceState) -> None:
        """Write ``seq``'s block table into staging row ``i``; only the entries added since the
        last step if the row already holds the rest.

        A block table changes in place only at its end (``BlockManager.allocate`` appends) and
        at its head together with ``num_released_blocks`` (sliding-window release); every other
        change (free, preemption, fork, a prefix-cache hit) gives the sequence a new list. So the
        row is current up to ``written`` when it was last written from this very list, with the
        same released count, and the list is no shorter (its last written entry is checked too).
        """
        bt = seq.block_table
        prev = self._table_rows[i]
        start = 0
        if prev is not None and prev[0] is bt and prev[1] == seq.num_released_blocks:
            written = prev[2]
            if written <= len(bt) and (written == 0 or row[written - 1] == bt[written - 1]):
                start = written
        if start < len(bt):
            row[start:len(bt)] = bt[start:]
        self._table_rows[i] = (bt, seq.num_released_blocks, len(bt))


class HostTwins:
    """Two page-locked int32 host buffers of one staging buffer, used in turn: :meth:`take` the
    next one (once the copy that last read it has run), fill it, queue its copy to the device,
    then hand that copy's event to :meth:`copied`. With asynchronous scheduling the host fills
    step N+1's inputs while step N's copy may still be queued behind N's prefill replay."""

    def __init__(self, numel: int, pin: bool) -> None:
        self.tensors = [torch.zeros(numel, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.arrays = [t.numpy() for t in self.tensors]
        self._events: list[DeviceEvent | None] = [None, None]
        self.slot = 0

    def take(self) -> int:
        """Switch to the other twin and return its index, after its last copy's event."""
        self.slot = slot = 1 - self.slot
        event, self._events[slot] = self._events[slot], None
        if event is not None:
            event.synchronize()
        return slot

    def copied(self, event: DeviceEvent | None) -> None:
        """The current twin's copy is queued behind ``event`` (``None``: it has run)."""
        self._events[self.slot] = event
