"""Tune the fused MoE GEMMs' tiles for one model's MoE shape on this GPU; write the device table.

    python3 packages/sagellm-cuda/benchmarks/tune_moe.py --model DIR --out DIR_OR_FILE \\
        [--budget-s 110] [--tp 1] [--dtype bfloat16] [--jobs N]
    python3 packages/sagellm-cuda/benchmarks/tune_moe.py --smoke --out DIR   (CPU, interpreter)

For each token-count bucket it times, per GEMM (gate/up with silu fused, then down), a pruned
grid of tiles for the ``BLOCK_M`` values that the expected rows per expert suggest, then refines
the winners' pipeline depth, grouping and warps. Both GEMMs of a bucket share the ``BLOCK_M``
with the lowest summed time (one alignment of the pairs per step). Each winning pair is checked
once against core's ``experts_reference``. Writes ``<device slug>.json`` (format:
``sagellm_cuda.moe_tiles``; an existing file keeps its other shapes' tables) and prints best
time against the heuristic per bucket.

Time: Triton compiles dominate, so ``--jobs`` processes compile every candidate into Triton's
cache first; the run watches ``--budget-s`` and, short of time, skips candidates, keeping the
best so far (buckets never timed, or where nothing beat the heuristic, get the heuristic and are
listed under ``"heuristic"``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096]
SMOKE_TOKENS = [1, 8]
SMEM_BYTES = 200 * 1024  # of the H200's 227 KB per block, some left for the compiler
ACC_REGS = 128  # fp32 accumulator registers per thread
FIRST_ANSWER_S = 40.0  # workers import torch and start CUDA before their first compile


@dataclass(frozen=True)
class Shape:
    experts: int
    top_k: int
    hidden: int
    inter: int  # per rank
    dtype: torch.dtype

    def gemm_nk(self, gemm: str) -> tuple[int, int]:
        return (self.inter, self.hidden) if gemm == "gate_up" else (self.hidden, self.inter)


def read_shape(model_dir: Path, tp: int, dtype: torch.dtype) -> Shape:
    """The MoE shape from a Hugging Face ``config.json`` (Qwen-MoE or Mixtral field names)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there")
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)

    def field(*names: str) -> int:
        for n in names:
            if isinstance(cfg.get(n), int) and cfg[n] > 0:
                return int(cfg[n])
        raise SystemExit(f"{path}: no positive integer {' or '.join(names)}; not an MoE config?")

    experts = field("num_experts", "num_local_experts")
    inter = field("moe_intermediate_size", "intermediate_size")
    if tp < 1 or inter % tp:
        raise SystemExit(f"--tp {tp} must be >= 1 and divide the MoE intermediate size {inter}")
    return Shape(experts, field("num_experts_per_tok"), field("hidden_size"), inter // tp, dtype)


# -- the search space ------------------------------------------------------------------------

def block_ms(tokens: int, shape: Shape) -> list[int]:
    """``BLOCK_M`` values worth timing, by the expected rows per expert."""
    rows = tokens * shape.top_k / shape.experts
    for limit, ms in ((8, [16]), (24, [16, 32]), (96, [32, 64]), (384, [64, 128])):
        if rows <= limit:
            return ms
    return [128, 64]


def fits(cfg: dict[str, int], gemm: str, elt: int) -> bool:
    """Within shared memory (all pipeline stages) and the accumulator's register budget."""
    cols = cfg["BLOCK_N"] * (2 if gemm == "gate_up" else 1)
    smem = cfg["num_stages"] * (cfg["BLOCK_M"] + cols) * cfg["BLOCK_K"] * elt
    regs = cfg["BLOCK_M"] * cols / (32 * cfg["num_warps"])
    return smem <= SMEM_BYTES and regs <= ACC_REGS


def _cfg(m: int, n: int, k: int, group: int, warps: int, stages: int) -> dict[str, int]:
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group, num_warps=warps,
                num_stages=stages)


def coarse_grid(gemm: str, bm: int, elt: int) -> list[dict[str, int]]:
    """Tile shapes at a default pipeline: small ``BLOCK_M`` is bound by reading weights (wide K
    tiles, deep pipelines, four warps), large by math (wider N, more warps, L2 grouping)."""
    if bm <= 32:  # as many stages as fit: the loads of the next K tiles hide the latency
        grid = [next((c for s in (5, 4, 3, 2) if fits(c := _cfg(bm, n, k, 1, 4, s), gemm, elt)),
                     _cfg(bm, n, k, 1, 4, 2))
                for n, k in itertools.product((32, 64, 128), (64, 128, 256))]
    else:
        grid = [_cfg(bm, n, k, 16, w, 3)
                for n, k, w in itertools.product((64, 128, 256), (64, 128), (4, 8))]
    return [c for c in grid if fits(c, gemm, elt)]


def refine_grid(cfg: dict[str, int], gemm: str, elt: int) -> list[dict[str, int]]:
    """Neighbours of a winner: other pipeline depths, the other grouping, the other warps."""
    out = [{**cfg, "num_stages": s} for s in (2, 3, 4, 5) if s != cfg["num_stages"]]
    out.append({**cfg, "GROUP_M": 1 if cfg["GROUP_M"] > 1 else 16})
    out.append({**cfg, "num_warps": 8 if cfg["num_warps"] == 4 else 4})
    return [c for c in out if fits(c, gemm, elt)]


def freeze(cfg: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(cfg.items()))


# -- inputs and timing -----------------------------------------------------------------------

class Bench:
    """Weights once, routing and activations per token count, launches of one GEMM timed."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0,
                 compile_only: bool = False) -> None:
        self.shape, self.device = shape, device
        e, h, i = shape.experts, shape.hidden, shape.inter
        if compile_only:  # shapes and dtypes are all a compile needs
            self.w13 = torch.empty(e, 2 * i, h, dtype=shape.dtype, device=device)
            self.w2 = torch.empty(e, h, i, dtype=shape.dtype, device=device)
        else:
            g = torch.Generator(device=device).manual_seed(seed)
            self.w13 = (torch.randn(e, 2 * i, h, generator=g, device=device) * h ** -0.5).to(
                shape.dtype)
            self.w2 = (torch.randn(e, h, i, generator=g, device=device) * i ** -0.5).to(
                shape.dtype)
        self._inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._aligned: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._fp32: tuple[torch.Tensor, torch.Tensor] | None = None
        # Flushed before each timed launch: a decode step finds no expert weights in L2.
        big = device.type == "cuda" and not compile_only
        self._flush = torch.empty(256 << 20 if big else 1, dtype=torch.int8, device=device)

    def inputs(self, tokens: int) -> tuple[torch.Tensor, ...]:
        """x, routing weights, expert ids (top-k of a softmax, as a router draws them), the
        gate/up output and the down output buffers."""
        if tokens not in self._inputs:
            from sagellm.layers.moe import select_experts

            s, dev = self.shape, self.device
            g = torch.Generator(device=dev).manual_seed(tokens)
            x = torch.randn(tokens, s.hidden, generator=g, device=dev).to(s.dtype)
            logits = torch.randn(tokens, s.experts, generator=g, device=dev)
            weights, ids = select_experts(logits, s.top_k, True)
            act = torch.randn(tokens * s.top_k, s.inter, generator=g, device=dev).to(s.dtype)
            down = torch.empty(tokens * s.top_k, s.hidden, dtype=s.dtype, device=dev)
            self._inputs[tokens] = (x, weights.reshape(-1).contiguous(), ids, act, down)
        return self._inputs[tokens]

    def aligned(self, tokens: int, bm: int) -> tuple[torch.Tensor, ...]:
        if (tokens, bm) not in self._aligned:
            from sagellm_cuda.moe_align import align_by_expert

            ids = self.inputs(tokens)[2]
            self._aligned[tokens, bm] = align_by_expert(ids, self.shape.experts, bm)
        return self._aligned[tokens, bm]

    def launch(self, gemm: str, tokens: int, cfg: dict[str, int], warmup: bool = False) -> None:
        from sagellm_cuda.moe import _gemm

        x, weights, _, act, down = self.inputs(tokens)
        aligned = self.aligned(tokens, cfg["BLOCK_M"])
        if gemm == "gate_up":
            _gemm(x, self.w13, act, weights, aligned, self.shape.top_k, self.shape.inter, True,
                  False, cfg, warmup)
        else:
            _gemm(act, self.w2, down, weights, aligned, 1, self.shape.hidden, False, True, cfg,
                  warmup)

    def time_us(self, gemm: str, tokens: int, cfg: dict[str, int]) -> float:
        """Median microseconds of one launch (each after an L2 flush on CUDA); inf if the
        config does not compile or launch here."""
        try:
            self.launch(gemm, tokens, cfg)  # compile (or load from Triton's cache)
            if self.device.type != "cuda":
                t0 = time.perf_counter()
                self.launch(gemm, tokens, cfg)
                return (time.perf_counter() - t0) * 1e6
            torch.cuda.synchronize()
            times = []
            for _ in range(12):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                self._flush.zero_()
                start.record()
                self.launch(gemm, tokens, cfg)
                end.record()
                times.append((start, end))
            torch.cuda.synchronize()
            return sorted(s.elapsed_time(e) * 1e3 for s, e in times)[len(times) // 2]
        except Exception as e:  # a tile that needs more shared memory or registers than here
            print(f"  skip {gemm} T={tokens} {cfg}: {type(e).__name__}: {str(e)[:120]}",
                  file=sys.stderr)
            return math.inf

    def check(self, tokens: int, up: dict[str, int], down: dict[str, int]) -> float:
        """Relative error of fused_experts with these tiles against experts_reference (fp32)."""
        from sagellm.layers.moe import experts_reference
        from sagellm_cuda.moe import fused_experts

        x, weights, ids, _, _ = self.inputs(tokens)
        w = weights.view(tokens, -1)
        got = fused_experts(x, self.w13, self.w2, w, ids, up, down).float()
        if self._fp32 is None:
            self._fp32 = self.w13.float(), self.w2.float()
        want = experts_reference(x.float(), *self._fp32, w, ids)
        return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


# -- compiling ahead in worker processes -----------------------------------------------------

def _warm(job: tuple[str, tuple[tuple[str, int], ...], tuple[int, int, int, int, str]]) -> bool:
    """In a worker: compile one (GEMM, config) into Triton's on-disk cache without running it."""
    gemm, cfg, (e, k, h, i, dtype) = job
    bench = _worker_bench(Shape(e, k, h, i, getattr(torch, dtype)))
    try:
        bench.launch(gemm, 16, dict(cfg), warmup=True)
        return True
    except Exception:
        return False


_BENCH: Bench | None = None


def _worker_bench(shape: Shape) -> Bench:
    global _BENCH
    if _BENCH is None or _BENCH.shape != shape:
        _BENCH = Bench(shape, torch.device("cuda"), compile_only=True)
    return _BENCH


class Precompiler:
    """A spawn pool compiling configs ahead; any failure only costs the main process the
    compile it would have done anyway."""

    def __init__(self, jobs: int, shape: Shape) -> None:
        self.pool = None
        self.shape = shape
        self.done: set[tuple[str, tuple[tuple[str, int], ...]]] = set()
        if jobs > 0:
            import multiprocessing as mp

            try:
                self.pool = mp.get_context("spawn").Pool(jobs)
            except Exception as e:  # compile in the main process instead
                print(f"no compile workers ({type(e).__name__}: {e})", file=sys.stderr)

    def compile(self, items: list[tuple[str, dict[str, int]]], timeout_s: float) -> None:
        todo = [j for j in dict.fromkeys((g, freeze(c)) for g, c in items) if j not in self.done]
        if self.pool is None or not todo or timeout_s <= 0:
            return
        s = self.shape
        spec = (s.experts, s.top_k, s.hidden, s.inter, str(s.dtype).removeprefix("torch."))
        t0 = time.perf_counter()
        self.done.update(todo)
        end = t0 + timeout_s
        ok = done = 0
        try:
            results = self.pool.imap_unordered(_warm, [(g, c, spec) for g, c in todo])
            for done in range(1, len(todo) + 1):
                # The first answer also waits for the workers to start; none by then: give up.
                wait = min(end, t0 + FIRST_ANSWER_S) if done == 1 else end
                ok += results.next(timeout=max(0.0, wait - time.perf_counter()))
        except Exception as e:  # timed out, or a worker died: the rest compile on first use
            print(f"precompile stopped after {done - 1}/{len(todo)} ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return
        print(f"precompiled {ok}/{len(todo)} configs in {time.perf_counter() - t0:.1f} s")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# -- the search ------------------------------------------------------------------------------

@dataclass
class Best:
    us: float = math.inf
    cfg: dict[str, int] | None = None


#: (tokens, GEMM, frozen config) -> microseconds, every timing of the run.
Timings = dict[tuple[int, str, tuple[tuple[str, int], ...]], float]
REUSE_SLACK = 1.03  # a config another bucket uses is taken when this close to the best


def tune(bench: Bench, tokens_list: list[int], grids: dict[tuple[str, int], list[dict[str, int]]],
         pre: Precompiler, deadline: float, refine: bool, timings: Timings
         ) -> dict[tuple[int, str, int], Best]:
    """Best time and config per (tokens, GEMM, BLOCK_M); every timing also into ``timings``."""
    elt = bench.w13.element_size()
    pre.compile([(g, c) for (g, _), cs in grids.items() for c in cs],
                0.45 * (deadline - time.perf_counter()))
    best: dict[tuple[int, str, int], Best] = {}
    for tokens in tokens_list:
        for bm in block_ms(tokens, bench.shape):
            for gemm in ("gate_up", "down"):
                b = best.setdefault((tokens, gemm, bm), Best())
                for cfg in grids[gemm, bm]:
                    if time.perf_counter() > deadline:
                        break
                    us = timings[tokens, gemm, freeze(cfg)] = bench.time_us(gemm, tokens, cfg)
                    if us < b.us:
                        b.us, b.cfg = us, cfg
    if refine and time.perf_counter() < deadline:
        around = {(t, g, bm): refine_grid(b.cfg, g, elt) for (t, g, bm), b in best.items()
                  if b.cfg is not None}
        pre.compile([(g, c) for (_, g, _), cs in around.items() for c in cs],
                    0.5 * (deadline - time.perf_counter()))
        for (tokens, gemm, bm), cands in around.items():
            b = best[tokens, gemm, bm]
            for cfg in cands:
                if time.perf_counter() > deadline:
                    break
                us = timings[tokens, gemm, freeze(cfg)] = bench.time_us(gemm, tokens, cfg)
                if us < b.us:
                    b.us, b.cfg = us, cfg
    return best


def choose(best: dict[tuple[int, str, int], Best], tokens: int, shape: Shape
           ) -> tuple[dict[str, int], dict[str, int], float] | None:
    """The BLOCK_M whose gate/up + down time is lowest, with both configs; None if untimed."""
    options = []
    for bm in block_ms(tokens, shape):
        up, down = best.get((tokens, "gate_up", bm)), best.get((tokens, "down", bm))
        if up and down and up.cfg and down.cfg:
            options.append((up.us + down.us, up.cfg, down.cfg))
    if not options:
        return None
    us, up_cfg, down_cfg = min(options, key=lambda o: o[0])
    return up_cfg, down_cfg, us


def reuse(cfg: dict[str, int], tokens: int, gemm: str, used: list[dict[str, int]],
          timings: Timings) -> dict[str, int]:
    """A config already in the table if it timed within :data:`REUSE_SLACK` of ``cfg`` here
    (same ``BLOCK_M``): fewer distinct kernels for the engine to compile at start-up."""
    best = timings.get((tokens, gemm, freeze(cfg)), math.inf)
    close = [(timings[tokens, gemm, freeze(c)], i) for i, c in enumerate(used)
             if c["BLOCK_M"] == cfg["BLOCK_M"] and (tokens, gemm, freeze(c)) in timings
             and timings[tokens, gemm, freeze(c)] <= best * REUSE_SLACK]
    return used[min(close)[1]] if close else cfg


def write_table(out: Path, device_name: str, shape: Shape, up: dict[int, dict[str, int]],
                down: dict[int, dict[str, int]], untuned: list[int]) -> Path:
    from sagellm_cuda.moe_tiles import device_slug, parse_tables, table_key

    path = out / f"{device_slug(device_name)}.json" if out.is_dir() or not out.suffix else out
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["device"] = device_name
    doc.setdefault("tables", {})
    doc.setdefault("heuristic", {})
    n_up, k_up = shape.gemm_nk("gate_up")
    n_dn, k_dn = shape.gemm_nk("down")
    for gemm, (n, k), table in (("gate_up", (n_up, k_up), up), ("down", (n_dn, k_dn), down)):
        key = table_key(shape.experts, n, k, shape.dtype, gemm)
        doc["tables"][key] = {str(t): c for t, c in sorted(table.items())}
        doc["heuristic"][key] = untuned
    parse_tables(doc, str(path))  # what we write must load back
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def assemble(bench: Bench, tokens_list: list[int], best: dict[tuple[int, str, int], Best],
             timings: Timings, heur: dict[int, dict[str, int]], heur_us: dict[int, float]
             ) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]], list[int]]:
    """The table's (gate/up, down) config per bucket, each winner checked against the
    reference; the heuristic where nothing beat it, nothing was timed or the check failed
    (those buckets listed third). Prints the comparison."""
    shape = bench.shape
    tol = 1e-4 if shape.dtype == torch.float32 else 2e-2
    up: dict[int, dict[str, int]] = {}
    down: dict[int, dict[str, int]] = {}
    kept: list[int] = []
    print(f"{'tokens':>6} {'heuristic us':>12} {'tuned us':>9} {'x':>5}  gate_up | down")
    for t in tokens_list:
        pick = choose(best, t, shape)
        if pick is not None and pick[2] <= heur_us[t]:
            u = reuse(pick[0], t, "gate_up", list(up.values()), timings)
            d = reuse(pick[1], t, "down", list(down.values()), timings)
            us = timings.get((t, "gate_up", freeze(u)), pick[2]) + timings.get(
                (t, "down", freeze(d)), 0.0)
            err = bench.check(t, u, d)
            if err < tol:
                up[t], down[t] = u, d
                print(f"{t:>6} {heur_us[t]:>12.1f} {us:>9.1f} {heur_us[t] / us:>5.2f}  "
                      f"{_short(u)} | {_short(d)}")
                continue
            print(f"{t:>6} winner FAILED the reference check (rel err {err:.2e})")
        up[t] = down[t] = heur[t]
        kept.append(t)
        print(f"{t:>6} {heur_us[t]:>12.1f} {'-':>9} {'':>5}  heuristic kept")
    return up, down, kept


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model directory with a config.json")
    ap.add_argument("--out", type=Path, required=True, help="directory or .json file to write")
    ap.add_argument("--budget-s", type=float, default=110.0)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (splits I)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--jobs", type=int, default=None,
                    help="compile processes (default: CPU cores - 2 on CUDA, 0 otherwise)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: tiny shape, two tiles, Triton's interpreter")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s * 0.85  # the rest: checks and writing
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shape = Shape(4, 2, 32, 32, torch.float32)
        device, tokens_list = torch.device("cpu"), SMOKE_TOKENS
        grids = {(g, 16): [_cfg(16, n, 32, 1, 4, 2) for n in (16, 32)] for g in ("gate_up", "down")}
        jobs, refine = 0, False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tune_moe.py needs a CUDA device (or --smoke)")
        if args.model is None:
            raise SystemExit("--model DIR is required (or --smoke)")
        shape = read_shape(args.model, args.tp, getattr(torch, args.dtype))
        device, tokens_list = torch.device("cuda"), TOKENS
        elt = torch.empty(0, dtype=shape.dtype).element_size()
        bms = sorted({bm for t in tokens_list for bm in block_ms(t, shape)})
        grids = {(g, bm): coarse_grid(g, bm, elt) for g in ("gate_up", "down") for bm in bms}
        jobs = args.jobs if args.jobs is not None else max(0, min(14, (os.cpu_count() or 2) - 2))
        refine = True
    from sagellm_cuda.moe_tiles import block_config

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{device_name}: E={shape.experts} top_k={shape.top_k} H={shape.hidden} "
          f"I={shape.inter} {shape.dtype}; {sum(map(len, grids.values()))} coarse configs, "
          f"{jobs} compile jobs, budget {args.budget_s:.0f} s")
    bench = Bench(shape, device)
    pre = Precompiler(jobs, shape)
    try:
        heur = {t: block_config(t * shape.top_k, shape.experts) for t in tokens_list}
        if not args.smoke:
            pre.compile([(g, c) for c in heur.values() for g in ("gate_up", "down")],
                        0.15 * args.budget_s)
        heur_us = {t: bench.time_us("gate_up", t, c) + bench.time_us("down", t, c)
                   for t, c in heur.items()}
        timings: Timings = {}
        best = tune(bench, tokens_list, grids, pre, deadline, refine, timings)
    finally:
        pre.close()
    up, down, untuned = assemble(bench, tokens_list, best, timings, heur, heur_us)
    distinct = len({freeze(c) for c in up.values()}) + len({freeze(c) for c in down.values()})
    print(f"{distinct} distinct kernels in the table")
    path = write_table(args.out, device_name, shape, up, down, untuned)
    print(f"wrote {path} in {time.perf_counter() - t_start:.0f} s"
          + (f"; heuristic kept for tokens {untuned}" if untuned else ""))
    return path


def _short(cfg: dict[str, int]) -> str:
    return "m{BLOCK_M} n{BLOCK_N} k{BLOCK_K} g{GROUP_M} w{num_warps} s{num_stages}".format(**cfg)


if __name__ == "__main__":
    main()
