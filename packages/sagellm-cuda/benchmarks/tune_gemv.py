"""Tune the decode products (fp8 W8A16 GEMV, int4 W4A16) for Llama-3.1-8B's linears on this GPU.

    python3 packages/sagellm-cuda/benchmarks/tune_gemv.py --out FILE.json \\
        [--write-to packages/sagellm-cuda/src/sagellm_cuda/gemv_configs] [--budget-s 190] \\
        [--kinds fp8,int4] [--shapes qkv,o,gate_up,down,lm_head] [--fp8-group 0] [--int4-group 128]
    python3 packages/sagellm-cuda/benchmarks/tune_gemv.py --smoke --out FILE.json   (CPU)

For each kind, shape and row count (1, 2, 4, 8, 16) it times the kernel's heuristic launch, then
a fixed set of tiles (``BLOCK_M`` 1 = one row without ``tl.dot``, or 16; ``BLOCK_N``, ``BLOCK_K``,
warps, stages) each at the few ``SPLIT_K`` values that keep every split two K tiles or more and
the grid within a few waves. Each candidate's first output is checked against a float32 torch
reference (a wrong one is never kept). A launch is timed inside a CUDA graph of several launches
over copies of the weight that together exceed the L2 cache (a decode step finds no weight in
L2). Writes ``--out`` (this run's table, with timings) and, with ``--write-to DIR``, merges it
into ``DIR/<device slug>.json`` (format: :mod:`sagellm_cuda.gemv_tiles`; other shapes' entries
kept). Prints achieved GB/s (weight + scale bytes over time) per entry.

Time: compiles dominate (one per distinct tile, ``SPLIT_K`` > 1 and ``M == 1`` compile their
own: about 60 for both kinds), then about 1,350 timed candidates; ``--budget-s`` stops the
search, keeping the best so far (the heuristic where nothing else was timed). Entries run fp8
first, then int4: a cut budget leaves int4 least tuned (``--kinds int4`` tunes it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
ROWS = [1, 2, 4, 8, 16]
SMOKE_SHAPES = {"tiny": (48, 256)}
SMOKE_ROWS = [1, 3]
L2_BYTES = 50 << 20  # an H200's; the timed copies of a weight together exceed it 4x
#: (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M, per kind.
TILES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fp8": {16: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 4),
                 (16, 256, 4, 4)],
            1: [(16, 512, 4, 3), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3),
                (8, 1024, 4, 3)]},
    # A decode tile loads each packed word once, so BLOCK_K 256 stages only 32 word rows; a
    # one-row tile keeps BLOCK_N x BLOCK_K unpacked weights in registers (8 warps past 8 K).
    "int4": {16: [(128, 128, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3), (64, 256, 4, 4)],
             1: [(64, 128, 4, 4), (128, 128, 8, 4), (32, 256, 4, 4), (64, 256, 8, 4),
                 (128, 64, 4, 4), (256, 64, 8, 4)]},
}
SMOKE_TILES = {"fp8": {16: [(16, 64, 4, 2)], 1: [(16, 64, 4, 2), (8, 128, 4, 2)]},
               "int4": {16: [(16, 64, 4, 2)], 1: [(16, 64, 4, 2)]}}
SPLITS = (1, 2, 3, 4, 6, 8, 16)
WAVES = 8  # the most programs per SM a split grid may have


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    n: int
    k: int
    group: int  # 0: per output channel (fp8 only)
    m: int

    def key(self, dtype: torch.dtype) -> str:
        from sagellm_cuda.gemv_tiles import table_key

        return table_key(self.kind, self.n, self.k, self.group, dtype)

    def weight_bytes(self) -> int:
        """What one product reads of the weight: the codes and their scales (and zeros)."""
        if self.kind == "fp8":
            return self.n * self.k + 4 * self.n * (1 if self.group == 0 else self.k // self.group)
        return self.n * self.k // 2 + 2 * 2 * self.n * (self.k // self.group)


def freeze(cfg: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(cfg.items()))


# -- the search space ------------------------------------------------------------------------

def block_ms(m: int) -> list[int]:
    """``BLOCK_M`` values worth timing: one row a program re-reads the weight per row, so only
    up to two rows."""
    return [1, 16] if m <= 2 else [16]


def split_options(e: Entry, block_m: int, block_n: int, block_k: int, num_sms: int) -> list[int]:
    """``SPLIT_K`` values that give distinct launches: each split two K tiles or more, the grid
    within :data:`WAVES` programs per SM (1 always kept)."""
    from sagellm_cuda.split_k import SPLIT_TILES

    tiles = -(-e.n // block_n) * (e.m if block_m == 1 else -(-e.m // block_m))
    k_tiles = -(-e.k // block_k)
    out, seen = [], set()
    for s in SPLITS:
        per = -(-k_tiles // s)  # K tiles per split, as the kernels round it
        eff = -(-k_tiles // per)
        if eff in seen or (eff > 1 and (per < 2 or tiles * eff > WAVES * num_sms)):
            continue
        if eff > 1 and e.kind == "fp8" and tiles > SPLIT_TILES:
            continue
        seen.add(eff)
        out.append(eff)
    return out


def fits(e: Entry, cfg: dict[str, int]) -> bool:
    """The kernel can run ``cfg`` for ``e``: a K tile inside one fp8 scale group; a dot tile of
    at least 16 by 16."""
    if cfg["BLOCK_M"] > 1 and (cfg["BLOCK_N"] < 16 or cfg["BLOCK_K"] < 16):
        return False
    if e.kind == "fp8" and e.group and e.group % cfg["BLOCK_K"]:
        return False
    return cfg["BLOCK_K"] <= e.k


def candidates(e: Entry, tiles: dict[int, list[tuple[int, int, int, int]]],
               num_sms: int) -> list[dict[str, int]]:
    """Every config to time for ``e``, in the order to time them."""
    out = []
    for bm in block_ms(e.m):
        for bn, bk, w, st in tiles.get(bm, []):
            base = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
            for s in split_options(e, bm, bn, bk, num_sms):
                cfg = dict(base, SPLIT_K=s)
                if fits(e, cfg):
                    out.append(cfg)
    return out


def heuristic(e: Entry, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """What the kernel runs with no table (each kernel's own fallback)."""
    if e.kind == "fp8":
        from sagellm_cuda.fp8_kernels import gemv_heuristic

        return gemv_heuristic(e.m, e.n, e.k, e.group, device)
    from sagellm_cuda.int4_gemm import _num_sms, _smem_per_block, launch_config

    return launch_config(e.m, e.n, e.k, e.group, _num_sms(device.index),
                         _smem_per_block(device.index))


# -- the search ------------------------------------------------------------------------------

@dataclass
class Result:
    heuristic_us: float
    best_us: float
    best: dict[str, int]
    timed: int = 0
    failed: list[str] = field(default_factory=list)


TimeFn = Callable[[Entry, dict[str, int]], float]
CheckFn = Callable[[Entry, dict[str, int]], float]


def tune(entries: list[Entry], heur: dict[Entry, dict[str, int]],
         cands: dict[Entry, list[dict[str, int]]], time_us: TimeFn, check: CheckFn, tol: float,
         deadline: float) -> dict[Entry, Result]:
    """The fastest config per entry among those whose output is within ``tol`` (relative) of
    the reference. The heuristics are timed first, all of them, so a budget cut still leaves
    every entry its baseline; a candidate that raises or is inexact is recorded and skipped."""
    results: dict[Entry, Result] = {}
    for e in entries:
        try:
            us = time_us(e, heur[e])
            err = check(e, heur[e])
        except Exception as ex:  # then any candidate that runs beats it
            us, err = math.inf, math.inf
            print(f"{e}: the heuristic launch failed ({type(ex).__name__}: {str(ex)[:100]})",
                  file=sys.stderr)
        results[e] = Result(us, us, dict(heur[e]))
        if not err < tol:  # what runs without a table: say so loudly, keep it as the baseline
            results[e].failed.append(f"HEURISTIC {heur[e]}: rel err {err:.2e}")
            print(f"{e}: the heuristic launch is off the reference (rel err {err:.2e})",
                  file=sys.stderr)
    t0 = time.perf_counter()
    for e in entries:
        r = results[e]
        print(f"{e.kind} {e.name} M={e.m}: {len(cands[e])} candidates "
              f"({time.perf_counter() - t0:.0f} s in)", flush=True)
        for cfg in cands[e]:
            if time.perf_counter() > deadline:
                print("budget spent: the remaining entries keep their best so far", flush=True)
                return results
            if freeze(cfg) == freeze(heur[e]):
                continue
            try:
                err = check(e, cfg)
                if not err < tol:
                    r.failed.append(f"{cfg}: rel err {err:.2e}")
                    continue
                us = time_us(e, cfg)
            except Exception as ex:  # a tile the device refuses (shared memory, registers)
                r.failed.append(f"{cfg}: {type(ex).__name__}: {str(ex)[:100]}")
                continue
            r.timed += 1
            if us < r.best_us:
                r.best_us, r.best = us, dict(cfg)
    return results


def table_doc(device_name: str, dtype: torch.dtype, results: dict[Entry, Result]) -> dict:
    """The table (:mod:`sagellm_cuda.gemv_tiles` format) with each entry's timings beside it."""
    tables: dict[str, dict[str, dict[str, int]]] = {}
    measured: dict[str, dict[str, dict[str, float]]] = {}
    for e, r in results.items():
        key = e.key(dtype)
        tables.setdefault(key, {})[str(e.m)] = dict(sorted(r.best.items()))
        gbps = e.weight_bytes() / (r.best_us * 1e3) if math.isfinite(r.best_us) else 0.0
        measured.setdefault(key, {})[str(e.m)] = dict(
            heuristic_us=round(r.heuristic_us, 2), tuned_us=round(r.best_us, 2),
            GBps=round(gbps, 1), timed=r.timed)
    return {"device": device_name, "tables": tables, "measured": measured}


def write_table(path: Path, doc: dict, merge: bool) -> Path:
    """Write ``doc`` to ``path`` (a directory: its ``<device slug>.json``); ``merge`` keeps the
    existing file's other keys. What is written must load back."""
    from sagellm_cuda.gemv_tiles import parse_tables
    from sagellm_cuda.moe_tiles import device_slug

    if path.is_dir() or not path.suffix:
        path = path / f"{device_slug(doc['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"device": doc["device"], "tables": {}, "measured": {}}
    if merge and path.exists():
        old = json.loads(path.read_text())
        parse_tables(old, str(path))
        out["tables"].update(old["tables"])
        out["measured"].update(old.get("measured", {}))
    out["tables"].update(doc["tables"])
    out["measured"].update(doc["measured"])
    parse_tables(out, str(path))
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return path


def report(results: dict[Entry, Result]) -> None:
    print(f"{'kind':<5} {'shape':<8} {'N':>6} {'K':>6} {'M':>3} {'heur us':>8} {'tuned us':>8}"
          f" {'x':>5} {'GB/s':>6}  config")
    for e, r in results.items():
        gbps = e.weight_bytes() / (r.best_us * 1e3) if math.isfinite(r.best_us) else 0.0
        c = r.best
        print(f"{e.kind:<5} {e.name:<8} {e.n:>6} {e.k:>6} {e.m:>3} {r.heuristic_us:>8.1f} "
              f"{r.best_us:>8.1f} {r.heuristic_us / r.best_us:>5.2f} {gbps:>6.0f}  "
              f"m{c['BLOCK_M']} n{c['BLOCK_N']} k{c['BLOCK_K']} s{c['SPLIT_K']} "
              f"w{c['num_warps']} st{c['num_stages']}  ({r.timed} timed, "
              f"{len(r.failed)} refused)")
        for f in r.failed[:3]:
            print(f"      refused {f}", file=sys.stderr)


# -- inputs, reference and timing on a device --------------------------------------------------

class Bench:
    """Weights per (kind, shape), as many copies as exceed the L2; activations per row count."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cuda: bool) -> None:
        self.device, self.dtype, self.cuda = device, dtype, cuda
        self._weights: dict[tuple[str, int, int, int], list[tuple[torch.Tensor, ...]]] = {}
        self._ref: dict[Entry, torch.Tensor] = {}
        self._x: dict[tuple[int, int], torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda else None

    def weights(self, e: Entry) -> list[tuple[torch.Tensor, ...]]:
        wk = (e.kind, e.n, e.k, e.group)
        if wk not in self._weights:
            copies = max(1, -(-4 * L2_BYTES // e.weight_bytes())) if self.cuda else 1
            g = torch.Generator(device=self.device).manual_seed(e.n + e.k)
            self._weights.clear()  # one shape's copies at a time (the LM head's are 0.5 GB)
            self._ref.clear()
            self._weights[wk] = [self._make(e, g) for _ in range(copies)]
        return self._weights[wk]

    def _make(self, e: Entry, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        dev = self.device
        if e.kind == "fp8":
            from sagellm.quant.fp8_grid import FP8_DTYPE

            q = (torch.randn(e.n, e.k, generator=g, device=dev) * 64).to(FP8_DTYPE)
            cols = 1 if e.group == 0 else e.k // e.group
            s = torch.rand(e.n, cols, generator=g, device=dev) * 1e-3 + 1e-4
            return q, s
        words = torch.randint(-2 ** 31, 2 ** 31 - 1, (e.k // 8, e.n), generator=g, device=dev,
                              dtype=torch.int64).to(torch.int32)
        groups = e.k // e.group
        scales = (torch.rand(groups, e.n, generator=g, device=dev) * 1e-2 + 1e-3).to(self.dtype)
        zeros = torch.full((groups, e.n), 8.0, device=dev, dtype=self.dtype)
        return words, scales, zeros

    def x(self, e: Entry) -> torch.Tensor:
        if (e.m, e.k) not in self._x:
            g = torch.Generator(device=self.device).manual_seed(e.m)
            self._x[e.m, e.k] = torch.randn(e.m, e.k, generator=g, device=self.device).to(
                self.dtype)
        return self._x[e.m, e.k]

    def launch(self, e: Entry, cfg: dict[str, int], w: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if e.kind == "fp8":
            from sagellm_cuda.fp8_kernels import fp8_gemv

            return fp8_gemv(self.x(e), w[0], w[1], config=cfg)
        from sagellm_cuda.int4_gemm import w4a16_matmul

        return w4a16_matmul(self.x(e), w[0], w[1], w[2], None, e.group, config=cfg)

    def reference(self, e: Entry) -> torch.Tensor:
        if e not in self._ref:
            w = self.weights(e)[0]
            x = self.x(e).float()
            if e.kind == "fp8":
                scale = w[1] if e.group == 0 else w[1].repeat_interleave(e.group, dim=1)
                self._ref[e] = x @ (w[0].float() * scale).t()
            else:
                from sagellm.quant.w4a16 import unpack_k

                g = torch.arange(e.k, device=self.device) // e.group
                deq = (unpack_k(w[0]).float() - w[2].float()[g]) * w[1].float()[g]
                self._ref[e] = x @ deq
                del deq
        return self._ref[e]

    def check(self, e: Entry, cfg: dict[str, int]) -> float:
        got = self.launch(e, cfg, self.weights(e)[0]).float()
        ref = self.reference(e)
        if not torch.isfinite(got).all():
            return math.inf
        return float((got - ref).norm() / ref.norm().clamp_min(1e-12))

    def time_us(self, e: Entry, cfg: dict[str, int]) -> float:
        """Microseconds a launch: a CUDA graph of launches over the weight's copies (at least
        eight), replayed five times after one warm replay; wall time on the CPU."""
        ws = self.weights(e)
        self.launch(e, cfg, ws[0])  # compile outside the capture
        if not self.cuda:
            t0 = time.perf_counter()
            self.launch(e, cfg, ws[0])
            return (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        n = max(8, len(ws))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            for i in range(n):
                self.launch(e, cfg, ws[i % len(ws)])
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / (5 * n)
        del graph
        return us


def entries_for(kinds: list[str], shapes: dict[str, tuple[int, int]], rows: list[int],
                fp8_group: int, int4_group: int) -> list[Entry]:
    out = []
    for kind in kinds:
        group = fp8_group if kind == "fp8" else int4_group
        for name, (n, k) in shapes.items():
            if group and k % group:
                raise SystemExit(f"--{kind}-group {group} does not divide K={k} of {name}")
            out.extend(Entry(kind, name, n, k, group, m) for m in rows)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="this run's table (.json), with timings")
    ap.add_argument("--write-to", type=Path,
                    help="merge into DIR/<device slug>.json (e.g. sagellm_cuda/gemv_configs)")
    ap.add_argument("--budget-s", type=float, default=190.0, help="search time (s)")
    ap.add_argument("--kinds", default="fp8,int4")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--fp8-group", type=int, default=0,
                    help="fp8 scale group (0: per output channel, as --quantization fp8 makes)")
    ap.add_argument("--int4-group", type=int, default=128)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: a tiny shape, Triton's interpreter")
    args = ap.parse_args(argv)
    if args.out is None and args.write_to is None:
        raise SystemExit("give --out FILE and/or --write-to DIR")
    kinds = args.kinds.split(",")
    if bad := [k for k in kinds if k not in TILES]:
        raise SystemExit(f"--kinds: unknown {bad}; choose from {list(TILES)}")
    if args.fp8_group < 0 or (args.fp8_group and args.fp8_group % 16):
        raise SystemExit(f"--fp8-group must be 0 or a multiple of 16, got {args.fp8_group}")
    if args.int4_group < 32 or args.int4_group % 32:
        raise SystemExit(f"--int4-group must be a positive multiple of 32, got {args.int4_group}")
    t_start = time.perf_counter()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, shapes, rows, tiles = (torch.device("cpu"), torch.float32, SMOKE_SHAPES,
                                              SMOKE_ROWS, SMOKE_TILES)
        args.int4_group = min(args.int4_group, 64)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tune_gemv.py needs a CUDA device (or --smoke)")
        names = args.shapes.split(",")
        if bad := [s for s in names if s not in SHAPES]:
            raise SystemExit(f"--shapes: unknown {bad}; choose from {list(SHAPES)}")
        device, dtype, rows, tiles = torch.device("cuda"), torch.bfloat16, ROWS, TILES
        shapes = {s: SHAPES[s] for s in names}
    entries = entries_for(kinds, shapes, rows, args.fp8_group, args.int4_group)
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else device.type
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 8
    bench = Bench(device, dtype, cuda)
    heur = {e: heuristic(e, device, dtype) for e in entries}
    cands = {e: candidates(e, tiles[e.kind], num_sms) for e in entries}
    print(f"{device_name}: {len(entries)} entries, {sum(map(len, cands.values()))} candidates, "
          f"budget {args.budget_s:.0f} s")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    results = tune(entries, heur, cands, bench.time_us, bench.check, tol,
                   t_start + args.budget_s)
    report(results)
    doc = table_doc(device_name, dtype, results)
    if args.out is not None:
        print(f"wrote {write_table(args.out, doc, merge=False)}")
    if args.write_to is not None:
        print(f"wrote {write_table(args.write_to, doc, merge=True)}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return doc


if __name__ == "__main__":
    main()
