"""A model runner that replays decode steps as CUDA graphs, greedy sampling included.

At start-up one graph is captured per padded batch size (1, 2, 4, 8, then multiples of 16 up to
``max_num_seqs``); all graphs share one memory pool and read their inputs from one static int32
buffer: token ids, positions, KV slots, context lengths and a block table as wide as
``max_model_len`` needs. A decode step then costs one host-to-device copy of that buffer (filled in
pinned memory), one graph launch and one device-to-host copy of the sampled ids, which is the only
synchronisation. The graph ends in the LM head and an argmax, so greedy requests never move
logits; other sampling settings run core's sampler on the graph's final hidden states.

Steps with prefill tokens run eagerly through core's :class:`ModelRunner` (their shapes vary).
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch
from torch import nn

from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.plan import StepPlan
from sagellm.layers.attention import ForwardContext
from sagellm.protocols import AttentionBackend, AttentionMetadata, DecodeMetadata, KVBackend

logger = logging.getLogger("sagellm.cuda.graphs")


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] < max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphModelRunner(ModelRunner):
    def __init__(self, model: nn.Module, kv: KVBackend, attention: AttentionBackend,
                 device: torch.device, block_size: int, *, max_model_len: int,
                 max_batch_size: int = 256, enforce_eager: bool = False) -> None:
        super().__init__(model, kv, attention, device, block_size)
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.enforce_eager = enforce_eager
        self.graph_sizes = graph_batch_sizes(max_batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.num_graph_steps = 0
        self.num_eager_steps = 0
        mb = max(self.graph_sizes)
        self.table_width = -(-max_model_len // block_size)
        # One int32 staging buffer, device and pinned host twins:
        # [ids | positions | slots | seq_lens] each mb long, then the block table mb x width.
        n = 4 * mb + mb * self.table_width
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._np = self._host.numpy()
        self._mb = mb
        self.out_ids = torch.zeros(mb, dtype=torch.int64, device=device)
        hidden = int(getattr(model, "config").hidden_size)
        dtype = next(model.parameters()).dtype
        self.out_hidden = torch.zeros(mb, hidden, dtype=dtype, device=device)
        if not enforce_eager:
            self.capture()
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
        ctx = ForwardContext(meta, self.kv.kv_caches(), self.attention)
        hidden = self.model(ids, pos, ctx)
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        self.out_ids[:bs].copy_(logits.argmax(-1))
        self.out_hidden[:bs].copy_(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        mb = self._mb
        # Padding rows: one token of context, nothing written.
        self._dev[3 * mb:4 * mb].fill_(1)
        self._dev[2 * mb:3 * mb].fill_(-1)
        self._np[3 * mb:4 * mb] = 1
        self._np[2 * mb:3 * mb] = -1
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.graph_sizes):
            self._static_forward(bs)  # compiles kernels for this shape outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._static_forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d decode graphs (batch %d..%d) in %.2f s", len(self.graphs),
                    self.graph_sizes[0], self.graph_sizes[-1], self.capture_seconds)

    def _padded(self, n: int) -> int | None:
        for bs in self.graph_sizes:
            if bs >= n:
                return bs
        return None

    # -- execution -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int]:
        n = len(plan.decodes)
        bs = self._padded(n) if (self.graphs and not plan.prefills and n) else None
        if bs is None:
            self.num_eager_steps += 1
            return super().execute(plan)
        self.num_graph_steps += 1
        if plan.blocks_to_copy:
            self.kv.copy_blocks(plan.blocks_to_copy)
        seqs = [op.seq for op in plan.decodes]
        self._fill(seqs, bs)
        end = 4 * self._mb + bs * self.table_width
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self.graphs[bs].replay()
        if all(s.params.temperature == 0.0 and not s.params.min_tokens for s in seqs):
            return self.out_ids[:n].tolist()
        logits = self.model.compute_logits(self.out_hidden[:n]).float()  # type: ignore[operator]
        self._suppress_early_stop(logits, seqs)
        return self.sampler(logits, self.sampling_batch(seqs)).tolist()

    def _fill(self, seqs: list, bs: int) -> None:  # type: ignore[type-arg]
        n = len(seqs)
        block = self.block_size
        ids, pos, slots, seq_lens, tables = self._views(self._np, bs)
        p = np.fromiter((s.num_tokens - 1 for s in seqs), dtype=np.int64, count=n)
        ids[:n] = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=n)
        pos[:n] = p
        seq_lens[:n] = p + 1
        last = np.fromiter((s.block_table[q // block] for s, q in zip(seqs, p.tolist())),
                           dtype=np.int64, count=n)
        slots[:n] = last * block + p % block
        for i, s in enumerate(seqs):
            bt = s.block_table
            tables[i, :len(bt)] = bt
        if bs > n:
            ids[n:] = 0
            pos[n:] = 0
            slots[n:] = -1
            seq_lens[n:] = 1
