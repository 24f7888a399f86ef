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

``--features`` measures instead the host cost of each per-request feature of
``sagellm.bench.features`` (plain, a small JSON schema, presence/frequency/repetition
penalties, logprobs=5; the rows of ``sagellm-cuda/benchmarks/step_cost.py``) at batch
``--features-batch``: the thread CPU time of whole steps with only the model stubbed
(``forward`` and ``compute_logits`` return rows of a cached logits table). Everything after the
model runs for real: the structured-output mask fill and apply, the penalty counts and their
application, the sampler, the logprobs op, the packed fetch and the TokenLogprob objects, the
grammar's accept, detokenization and outputs. The tensor ops there work on ``[N, 256]``
logits, so their CPU time stands in for what the host spends launching them on a GPU (the
dispatcher and launch overhead per op), not for the device's work. The mask fill runs on its
worker thread, so its own CPU time is not in the main thread's time (on a GPU it overlaps the
forward). The logits table favours ``a``, then ``"``, then ``1``, so greedy decoding under the
schema never closes the object (every request decodes every measured step); the other bytes
get small random logits. ``--runner graph`` runs the same through the CUDA graph runner's host
code (``sagellm_cuda.graphs``, a "replay" that writes the stub's ids and logits into the
graph's output buffers), which is the path the GPU takes; its logprobs op is still core's
torch one (the GPU runs two Triton launches instead). Per variant: min/median/max and the
ratio to plain of the medians, and a cProfile top list of the stubbed steps.

The CUDA graph runner's ``_fill`` (``sagellm_cuda.graphs``: the staging buffer of a decode
graph) is timed alone on the same kind of sequences, without a model or Triton.

The box this runs on may be shared: read min/max as well as the median and compare runs taken
at the same load.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
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
from sagellm.bench.features import feature_variants
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


def _profile_steps(engine, n: int, steps: int, top: int, *timer) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """cProfile of ``steps`` engine steps (``timer``: cProfile's clock, wall time if none):
    the top-``top`` table by own time and Python calls per sequence per step."""
    prof = cProfile.Profile(*timer)
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    calls = stats.total_calls / steps / n  # type: ignore[attr-defined]
    # Deterministic, unlike the timings on a shared box: compare these between versions.
    out.write(f"Python calls per sequence per step: {calls:.1f}\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue(), calls


def profile_engine(model: Path, n: int, steps: int, top: int = 20) -> str:
    engine = _start(model, n)
    _stub_model(engine)
    return _profile_steps(engine, n, steps, top)[0]


def _feature_logits(vocab: int, rows: int = 4096) -> torch.Tensor:
    """Rows of logits that keep greedy decoding under the schema open forever (``a`` first, then
    ``"``, then ``1``), with small random logits elsewhere (module docstring)."""
    g = torch.Generator().manual_seed(1)
    table = torch.rand(rows, vocab, generator=g)
    for byte, value in ((ord("a"), 12.0), (ord('"'), 11.0), (ord("1"), 10.0)):
        table[:, byte] = value
    return table


def _stub_forward_only(engine: LLMEngine) -> torch.Tensor:
    """Replace the runner's model (``forward``, ``compute_logits``) by rows of a cached table;
    the returned table also feeds the graph runner's stubbed replays."""
    runner = engine.runner
    hidden_size = engine.hf_config.hidden_size
    table = _feature_logits(engine.vocab_size)
    offset = [0]

    def forward(inp: Any) -> torch.Tensor:
        return torch.zeros(inp.logits_indices.shape[0], hidden_size)

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        o = offset[0] = (offset[0] + 7) % (table.shape[0] - 1024)
        return table[o:o + hidden.shape[0]].clone()

    runner.forward, runner.compute_logits = forward, compute_logits
    return table


def _graph_platform() -> CpuPlatform | None:
    """The CPU platform with the CUDA graph runner's host code, model stubbed (``None`` without
    sagellm-cuda)."""
    try:
        from sagellm_cuda.graphs import CudaGraphCapture, CudaGraphModelRunner
    except ImportError:
        return None

    class Replay:
        def __init__(self, fn: Callable[[], None]) -> None:
            self.replay = fn

    class StubCapture(CudaGraphCapture):
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def capture(self, forward: Callable[[], None]) -> Replay:
            return Replay(forward)

        def synchronize(self) -> None:
            pass

    class StubGraphRunner(CudaGraphModelRunner):
        graph_capture = StubCapture
        table: torch.Tensor | None = None
        offset = 0

        def _rows(self, n: int) -> torch.Tensor:
            assert self.table is not None
            self.offset = (self.offset + 7) % (self.table.shape[0] - 1024)
            return self.table[self.offset:self.offset + n]

        def _static_forward(self, bs: int) -> None:
            if self.table is None:  # at capture: nothing replays yet
                return
            rows = self._rows(self._mb)
            if self.out_logits is None:
                self.out_logits = torch.empty_like(rows)
            self.out_logits.copy_(rows)
            self.out_ids.copy_(rows.argmax(-1))

        def _static_prefill(self, tb: int) -> None:
            if self.table is None:
                return
            rows = self._rows(1)
            self.prefill_out_logits = rows.clone()
            self.prefill_out_ids.copy_(rows.argmax(-1))

    class GraphHostPlatform(CpuPlatform):
        name = "cpu-graph-host"

        def make_model_runner(self, ctx: Any) -> StubGraphRunner:
            runner = StubGraphRunner(ctx)
            gc.unfreeze()  # one process builds an engine per variant
            return runner

    return GraphHostPlatform()


def _start_feature(model: Path, n: int, extra: dict[str, object], graph: bool) -> LLMEngine:
    """An engine with ``n`` requests of one feature variant, model stubbed, all decoding."""
    platform = _graph_platform() if graph else CpuPlatform()
    if platform is None:
        raise SystemExit("--runner graph needs sagellm-cuda on the path")
    blocks = n * (-(-MAX_MODEL_LEN // BLOCK_SIZE)) + 16
    cfg = EngineConfig(model=str(model), dtype="float32", block_size=BLOCK_SIZE,
                       num_kv_blocks=blocks, max_num_seqs=max(n, 16), max_model_len=MAX_MODEL_LEN,
                       max_num_batched_tokens=8192, max_prefill_tokens=8192)
    engine = LLMEngine(cfg, registry=Registry(), platform=platform)
    table = _stub_forward_only(engine)
    if graph:
        runner: Any = engine.runner
        runner.table = table
        runner.logits_width = table.shape[1]
    g = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=MAX_MODEL_LEN - PROMPT_TOKENS, **extra)  # type: ignore[arg-type]
    for _ in range(n):
        engine.add_request(torch.randint(3, 256, (PROMPT_TOKENS,), generator=g).tolist(), params)
    while engine._compiling or engine.scheduler.waiting \
            or any(s.is_prefill for s in engine.scheduler.running):  # noqa: SLF001
        engine.step()
    for _ in range(3):  # warm-up decodes
        engine.step()
    return engine


def _count_torch_ops(engine: LLMEngine, steps: int) -> float:
    """Tensor operations dispatched per step (views included): deterministic, and on a GPU each
    one that is not a view is a launch or a copy the host pays for."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        for _ in range(steps):
            engine.step()
    return Count.n / steps


def measure_features(model: Path, n: int, steps: int, graph: bool, top: int = 15
                     ) -> list[dict[str, Any]]:
    """Thread CPU time per step of each feature variant, model stubbed; plus a cProfile."""
    rows = []
    for name, extra in feature_variants().items():
        engine = _start_feature(model, n, extra, graph)
        times = []
        for _ in range(steps):
            c = time.thread_time()
            outs = engine.step()
            times.append((time.thread_time() - c) * 1e6)
            assert len(outs) == n and not any(o.finished for o in outs), \
                f"{name}: every request decodes every measured step"
        ops = _count_torch_ops(engine, 10)
        # CPU time: other processes do not count.
        profile, calls = _profile_steps(engine, n, steps, top, time.thread_time)
        rows.append({"variant": name, "host_cpu_us": _stats(times),
                     "calls_per_seq_step": round(calls, 1),
                     "torch_ops_per_step": ops, "profile": profile})
        engine.shutdown()
    base = rows[0]["host_cpu_us"]["median"]
    for r in rows:
        r["x_plain"] = round(r["host_cpu_us"]["median"] / base, 3)
    return rows


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
    ap.add_argument("--features", action="store_true",
                    help="per-feature host time (plain, json_schema, penalties, logprobs5)")
    ap.add_argument("--features-batch", type=int, default=16)
    ap.add_argument("--runner", choices=("core", "graph"), default="core",
                    help="with --features: core's ModelRunner or the CUDA graph runner's host code")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()
    if args.features:
        features_main(args, load)
        return
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


def features_main(args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(Path(tmp) / "tiny", tokenizer=True,
                                max_position_embeddings=MAX_MODEL_LEN)
        rows = measure_features(model, args.features_batch, args.steps, args.runner == "graph")
    for r in rows:
        print(f"\n=== {r['variant']}: cProfile of {args.steps} steps, model stubbed ===\n"
              f"{r['profile']}")
    print(f"runner {args.runner}, batch {args.features_batch}, {args.steps} steps, "
          f"load {load[0]:.2f}")
    print(f"{'variant':<12} {'host cpu us/step':>17} {'(min..max)':>20} {'x plain':>8} "
          f"{'calls/seq/step':>15} {'torch ops/step':>15}")
    for r in rows:
        h = r["host_cpu_us"]
        print(f"{r['variant']:<12} {h['median']:>17.1f} {h['min']:>9.1f}..{h['max']:<9.1f} "
              f"{r['x_plain']:>8.3f} {r['calls_per_seq_step']:>15.1f} "
              f"{r['torch_ops_per_step']:>15.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "loadavg_before": load,
            "loadavg_after": os.getloadavg(), "steps": args.steps, "runner": args.runner,
            "batch": args.features_batch, "features": rows}, indent=2))


if __name__ == "__main__":
    main()
