"""Host time of one decode step, with the model's compute taken out.

    python packages/sagellm-core/benchmarks/host_step.py [--sizes 16,64,256] [--steps 40]
        [--profile 16] [--out results/host-step-DATE.json]

On a GPU the Python of a step (turning the sampled ids into outputs, scheduling the next step,
filling its inputs) runs while the device idles, so it adds straight to the step's wall time.
That Python is the same on every backend, so it is measured here on the CPU backend with a tiny
random Llama (byte-level tokenizer, so detokenization runs): ``N`` sequences with 512-token
prompts, greedy, ``ignore_eos``, all decoding. A step's host time is the wall time of
``LLMEngine.step()`` less the time spent inside the runner's ``forward``, ``compute_logits``
and ``sampler`` (wrapped and summed); the median over ``--steps`` steps is reported, in thread
CPU time (``time.thread_time``, torch on one thread: time lost to other processes on a shared
box is not counted) and in wall time.

The same steps with those three calls replaced by stubs (cached outputs of the right shape,
varying ids) give a second, steadier figure: the thread CPU time of the whole step, host work
alone, with caches not flushed by the model between steps (as on a GPU).

``--profile N`` also runs cProfile over the steps at batch ``N`` with those three calls
replaced by stubs (cached outputs of the right shape, varying ids), so the top-20 by own time
shows only host work.

The CUDA graph runner's ``_fill`` (``sagellm_cuda.graphs``: the staging buffer of a decode
graph) is timed alone on the same kind of sequences, without a model or Triton.

The box this runs on may be shared: read min/max as well as the median and compare runs taken
at the same load.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.sequence import SequenceState
from sagellm.plugins import Registry
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama

PROMPT_TOKENS = 512
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048


class Stopwatch:
    """Wraps callables and sums the wall and thread CPU time spent inside them."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - t
                self.cpu += time.thread_time() - c
        return timed


def _engine(model: Path, n: int) -> LLMEngine:
    blocks = n * (-(-MAX_MODEL_LEN // BLOCK_SIZE)) + 16
    cfg = EngineConfig(model=str(model), dtype="float32", block_size=BLOCK_SIZE,
                       num_kv_blocks=blocks, max_num_seqs=max(n, 16), max_model_len=MAX_MODEL_LEN,
                       max_num_batched_tokens=8192, max_prefill_tokens=8192)
    return LLMEngine(cfg, registry=Registry(), platform=CpuPlatform())


def _start(model: Path, n: int) -> LLMEngine:
    """An engine with ``n`` sequences past their prefill, all decoding."""
    engine = _engine(model, n)
    g = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=MAX_MODEL_LEN - PROMPT_TOKENS)
    for _ in range(n):
        engine.add_request(torch.randint(3, 256, (PROMPT_TOKENS,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up decodes
        engine.step()
    return engine


def _stub_model(engine: LLMEngine) -> None:
    """Replace the runner's model calls by cached outputs (host work only is left)."""
    runner = engine.runner
    hidden_size = engine.hf_config.hidden_size
    vocab = engine.vocab_size
    logits = torch.zeros(1024, vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (4096,), generator=g)
    offset = [0]

    def forward(inp: Any) -> torch.Tensor:
        return torch.zeros(inp.logits_indices.shape[0], hidden_size)

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        return logits[: hidden.shape[0]]

    def sampler(lg: torch.Tensor, batch: Any) -> torch.Tensor:
        o = offset[0] = (offset[0] + 7) % 2048
        return ids[o:o + lg.shape[0]]

    runner.forward, runner.compute_logits, runner.sampler = forward, compute_logits, sampler


def measure_engine(model: Path, n: int, steps: int) -> dict[str, Any]:
    engine = _start(model, n)
    runner = engine.runner
    watch = Stopwatch()
    runner.forward = watch.wrap(runner.forward)
    runner.compute_logits = watch.wrap(runner.compute_logits)
    runner.sampler = watch.wrap(runner.sampler)
    host, host_wall, wall = [], [], []
    for _ in range(steps):
        watch.wall = watch.cpu = 0.0
        t, c = time.perf_counter(), time.thread_time()
        outs = engine.step()
        dt, dc = time.perf_counter() - t, time.thread_time() - c
        assert len(outs) == n, "every sequence decodes every step"
        host.append((dc - watch.cpu) * 1e6)
        host_wall.append((dt - watch.wall) * 1e6)
        wall.append(dt * 1e6)
    return {"n": n, "host_us": _stats(host), "host_wall_us": _stats(host_wall),
            "wall_us": _stats(wall)}


def measure_stubbed(model: Path, n: int, steps: int) -> dict[str, float]:
    """Thread CPU time of whole steps with the model stubbed (host work alone, warm caches)."""
    engine = _start(model, n)
    _stub_model(engine)
    times = []
    for _ in range(steps):
        c = time.thread_time()
        engine.step()
        times.append((time.thread_time() - c) * 1e6)
    return _stats(times)


def profile_engine(model: Path, n: int, steps: int, top: int = 20) -> str:
    engine = _start(model, n)
    _stub_model(engine)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    # Deterministic, unlike the timings on a shared box: compare these between versions.
    out.write(f"Python calls per sequence per step: {stats.total_calls / steps / n:.1f}\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _fake_seqs(n: int) -> list[SequenceState]:
    g = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.0)
    seqs = []
    for i in range(n):
        s = SequenceState(f"r{i}", torch.randint(3, 256, (PROMPT_TOKENS,), generator=g).tolist(),
                          params)
        for t in range(100 + i % 16):
            s.append_token(t)
        s.block_table = list(range(i * 64, i * 64 + -(-s.num_tokens // BLOCK_SIZE)))
        s.num_computed_tokens = s.num_tokens - 1
        seqs.append(s)
    return seqs


def measure_graph_fill(n: int, repeats: int) -> dict[str, Any] | None:
    """``CudaGraphModelRunner._fill`` for ``n`` decoding sequences (host buffers only)."""
    try:
        from sagellm_cuda.graphs import CudaGraphModelRunner, graph_batch_sizes
    except ImportError:
        return None
    sizes = graph_batch_sizes(max(n, 16))
    bs = next(b for b in sizes if b >= n)
    runner = object.__new__(CudaGraphModelRunner)  # only the staging buffers, no model
    runner.block_size = BLOCK_SIZE
    runner.table_width = -(-MAX_MODEL_LEN // BLOCK_SIZE)
    runner._mb = max(sizes)
    runner._np = np.zeros(4 * runner._mb + runner._mb * runner.table_width, dtype=np.int32)
    runner._table_rows = [None] * runner._mb  # the row cache (unused by runners without one)
    seqs = _fake_seqs(n)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner._fill(seqs, bs)
        times.append((time.perf_counter() - t) * 1e6)  # wall: thread_time is too coarse here
        for s in seqs:  # the next step: one more token each, a new block at block edges
            s.append_token(7)
            if s.num_tokens > len(s.block_table) * BLOCK_SIZE:
                s.block_table.append(len(s.block_table) + 100_000)
            s.num_computed_tokens = s.num_tokens - 1
    return {"n": n, "fill_us": _stats(times)}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1),
            "max": round(max(xs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", type=int, default=0, help="batch size to profile (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(Path(tmp) / "tiny", tokenizer=True,
                                max_position_embeddings=MAX_MODEL_LEN)
        rows = [measure_engine(model, n, args.steps) for n in sizes]
        stubbed = [measure_stubbed(model, n, args.steps) for n in sizes]
        fills = [measure_graph_fill(n, 200) for n in sizes]
        prof = profile_engine(model, args.profile, args.steps) if args.profile else None
    print(f"{'N':>5} {'host cpu us/step':>17} {'(min..max)':>18} {'host wall us':>13} "
          f"{'step wall us':>13} {'stubbed cpu us':>15} {'graph _fill us':>15}")
    for r, st, f in zip(rows, stubbed, fills, strict=True):
        h = r["host_us"]
        fill = f"{f['fill_us']['median']:.1f}" if f else "-"
        print(f"{r['n']:>5} {h['median']:>17.1f} {h['min']:>8.1f}..{h['max']:<9.1f} "
              f"{r['host_wall_us']['median']:>13.1f} {r['wall_us']['median']:>13.1f} "
              f"{st['median']:>15.1f} {fill:>15}")
    if prof:
        print(f"\ncProfile, batch {args.profile}, {args.steps} steps, model stubbed:\n{prof}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "loadavg_before": load,
            "loadavg_after": os.getloadavg(), "steps": args.steps, "engine": rows,
            "stubbed_cpu_us": stubbed, "graph_fill": fills}, indent=2))


if __name__ == "__main__":
    main()
