"""serve_c16's shape through the offline engine, step by step: where a feature's serving cost goes.

16 closed-loop "clients" (each adds its next request the moment its last one finished), 64
requests of 512 random prompt ids and 256 tokens out, greedy and ``ignore_eos``, as
``sagellm bench``'s ``serve_c16`` but without HTTP, so what is left is the engine's own. Variants:

- ``plain``, ``json_schema``, ``penalties``, ``logprobs5``: as ``gpu_api_cost.sh``;
- ``plain_staggered``: plain with ``max_tokens`` 256 less 0..19 per request (``(7 * i) % 20``),
  so requests end on different steps as a JSON grammar makes them: the cost of clients falling
  out of step, with no grammar in it.

Per variant it prints output tok/s, the time from a request's arrival to its first token, and
the interval between the engine's step returns (the device's step time when it is the bound)
grouped by what the awaited step held: decodes only, or decodes with k prompts (whole or
chunks). The slowest steps are listed with their composition. For constrained variants it also
reports the mask-fill worker's time per step and how long the runner waited for it.

    python3 packages/sagellm-cuda/benchmarks/closed_loop.py --model .benchmodel/qwen2.5-1.5b-arch
    python3 packages/sagellm-cuda/benchmarks/closed_loop.py --tiny             # CPU smoke run
    ... --json out.json                                                           # raw numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def variants() -> dict[str, dict[str, object]]:
    from sagellm.bench.features import feature_variants

    table = feature_variants()
    table["plain_staggered"] = {}
    return table


def build_engine(args: argparse.Namespace, model: str):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    kw: dict[str, object] = dict(model=model, max_model_len=args.max_model_len,
                                 max_num_seqs=max(16, args.clients))
    if args.tiny:
        kw.update(backend="cpu", dtype="float32", block_size=4, num_kv_blocks=4096)
    else:
        kw.update(backend=args.backend, load_format=args.load_format)
    return LLMEngine(EngineConfig(**kw))  # type: ignore[arg-type]


class Recorder:
    """The plans the scheduler hands out (by step id) and the mask fills' times."""

    def __init__(self, engine: Any) -> None:
        from sagellm.engine import mask_fill

        self.plans: dict[int, tuple[int, int, int]] = {}
        self.fill_s: list[float] = []
        self.wait_s: list[float] = []
        #: The last non-empty step planned (a synchronous engine runs it in the same call).
        self.last_planned: int | None = None
        schedule = engine.scheduler.schedule

        def recording_schedule(*a: Any, **kw: Any) -> Any:
            plan = schedule(*a, **kw)
            if not plan.is_empty:
                self.plans[plan.step_id] = (len(plan.prefills),
                                            sum(op.num_tokens for op in plan.prefills),
                                            len(plan.decodes))
                self.last_planned = plan.step_id
            return plan

        engine.scheduler.schedule = recording_schedule
        fill, take = mask_fill._fill, mask_fill.MaskFill.take

        def timed_fill(*a: Any) -> None:
            t0 = time.perf_counter()
            try:
                fill(*a)
            finally:
                self.fill_s.append(time.perf_counter() - t0)

        def timed_take(mf: Any, *a: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return take(mf, *a)
            finally:
                self.wait_s.append(time.perf_counter() - t0)

        mask_fill._fill = timed_fill
        mask_fill.MaskFill.take = timed_take  # type: ignore[method-assign]

    def reset(self) -> None:
        self.plans.clear()
        self.fill_s.clear()
        self.wait_s.clear()


def awaited_step(engine: Any) -> int | None:
    """The step whose tokens the next ``engine.step()`` returns: the one queued ahead, or
    (steps waited one by one) the one that call plans, known only after it (``None``)."""
    pipe = engine.pipeline
    if pipe is not None:
        return pipe.inflight.plan.step_id if pipe.inflight is not None else None
    return None


def run_variant(engine: Any, rec: Recorder, name: str, extra: dict[str, object],
                args: argparse.Namespace) -> dict[str, Any]:
    from sagellm.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = min(engine.vocab_size, 32000)
    prompts = [torch.randint(10, vocab, (args.input_len,), generator=g).tolist()
               for _ in range(args.num_requests)]
    if name == "plain_staggered":
        max_tokens = [args.output_len - (7 * i) % 20 for i in range(args.num_requests)]
    else:
        max_tokens = [args.output_len] * args.num_requests
    rec.reset()
    sent = 0
    arrival: dict[str, float] = {}
    ttft: list[float] = []
    out_tokens = 0

    def send() -> None:
        nonlocal sent
        params = SamplingParams(max_tokens=max(1, max_tokens[sent]), temperature=0.0,
                                ignore_eos=True, **extra)  # type: ignore[arg-type]
        rid = engine.add_request(prompts[sent], params)
        arrival[rid] = time.perf_counter()
        sent += 1

    for _ in range(min(args.clients, args.num_requests)):
        send()
    intervals: list[tuple[float, int | None]] = []
    t_start = last = time.perf_counter()
    while engine.has_unfinished_requests():
        awaited = awaited_step(engine)
        before = rec.last_planned
        outs = engine.step()
        now = time.perf_counter()
        if engine.pipeline is None and rec.last_planned != before:
            awaited = rec.last_planned
        intervals.append((now - last, awaited))
        last = now
        for o in outs:
            if o.error:
                raise RuntimeError(f"{name}: {o.error}")
            if o.request_id in arrival and o.new_token_ids:
                ttft.append(now - arrival.pop(o.request_id))
            if o.finished:
                out_tokens += o.num_output_tokens
                if sent < args.num_requests:
                    send()
    secs = time.perf_counter() - t_start
    return summarize(name, secs, out_tokens, ttft, intervals, rec)


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def summarize(name: str, secs: float, out_tokens: int, ttft: list[float],
              intervals: list[tuple[float, int | None]], rec: Recorder) -> dict[str, Any]:
    groups: dict[str, list[float]] = defaultdict(list)
    slow: list[tuple[float, str]] = []
    for dt, sid in intervals:
        comp = rec.plans.get(sid) if sid is not None else None
        if comp is None:
            kind = "unknown"
            desc = "?"
        else:
            n_pre, pre_tok, n_dec = comp
            k = f"{n_pre}p" if n_pre <= 4 else "5+p"
            kind = "decode" if n_pre == 0 else (f"{k}+decode" if n_dec else k)
            desc = f"{n_dec} decodes, {n_pre} prompts ({pre_tok} tokens)"
        groups[kind].append(dt)
        slow.append((dt, desc))
    slow.sort(reverse=True)
    return {
        "variant": name, "seconds": secs, "out_tokens": out_tokens,
        "out_tok_s": out_tokens / secs,
        "ttft_ms": {"p50": pct(ttft, 0.5) * 1e3, "p90": pct(ttft, 0.9) * 1e3},
        "steps": {k: {"n": len(v), "sum_ms": sum(v) * 1e3, "p50_ms": pct(v, 0.5) * 1e3,
                      "p99_ms": pct(v, 0.99) * 1e3} for k, v in sorted(groups.items())},
        "slowest": [(round(dt * 1e3, 2), d) for dt, d in slow[:8]],
        "mask_fill_ms": {"n": len(rec.fill_s), "p50": pct(rec.fill_s, 0.5) * 1e3,
                         "p99": pct(rec.fill_s, 0.99) * 1e3, "max": max(rec.fill_s, default=0) * 1e3},
        "mask_wait_ms": {"n": len(rec.wait_s), "p50": pct(rec.wait_s, 0.5) * 1e3,
                         "p99": pct(rec.wait_s, 0.99) * 1e3,
                         "sum": sum(rec.wait_s) * 1e3},
    }


def report(r: dict[str, Any], base: float | None) -> None:
    ratio = f", {r['out_tok_s'] / base:.3f}x plain" if base else ""
    print(f"\n=== {r['variant']}: {r['out_tok_s']:,.0f} tok/s ({r['out_tokens']} tokens in "
          f"{r['seconds']:.2f} s{ratio}); first token p50 {r['ttft_ms']['p50']:.1f} ms, "
          f"p90 {r['ttft_ms']['p90']:.1f} ms")
    print(f"  {'awaited step':<14}{'n':>6}{'sum ms':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for k, s in r["steps"].items():
        print(f"  {k:<14}{s['n']:>6}{s['sum_ms']:>10.1f}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}")
    print("  slowest:", "; ".join(f"{dt} ms ({d})" for dt, d in r["slowest"][:5]))
    if r["mask_fill_ms"]["n"]:
        f, w = r["mask_fill_ms"], r["mask_wait_ms"]
        print(f"  mask fill on the worker: {f['n']} fills, p50 {f['p50']:.3f} ms, p99 "
              f"{f['p99']:.3f}, max {f['max']:.2f}; runner waited p50 {w['p50']:.3f} ms, "
              f"p99 {w['p99']:.3f}, {w['sum']:.1f} ms in all")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (weights not needed with --load-format dummy)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU backend")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per variant (best kept)")
    ap.add_argument("--variants", default="plain,plain_staggered,json_schema,penalties,logprobs5")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args(argv)
    if args.tiny:
        from sagellm.testing.tiny_model import make_tiny_llama

        model = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", tokenizer=True))
        args.clients, args.num_requests, args.input_len, args.output_len = 4, 8, 16, 40
        args.max_model_len, args.reps = 256, 1
    elif args.model:
        model = args.model
    else:
        ap.error("give --model DIR or --tiny")
    engine = build_engine(args, model)
    rec = Recorder(engine)
    table = variants()
    warm = argparse.Namespace(**dict(args.__dict__, num_requests=args.clients, output_len=8))
    runs: dict[str, list[dict[str, Any]]] = {}
    base = None
    for name in args.variants.split(","):
        run_variant(engine, rec, name, table[name], warm)  # first use of the feature: compiles
        runs[name] = [run_variant(engine, rec, name, table[name], args) for _ in range(args.reps)]
        best = max(runs[name], key=lambda r: r["out_tok_s"])
        if name == "plain":
            base = best["out_tok_s"]
        report(best, base)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                               "runs": runs}, indent=1))
    print(f"\n{'variant':<16}{'tok/s (best)':>14}{'x plain':>9}{'runs':>30}")
    for name, rs in runs.items():
        best = max(r["out_tok_s"] for r in rs)
        print(f"{name:<16}{best:>14,.0f}{best / base if base else float('nan'):>9.3f}"
              f"{str([round(r['out_tok_s']) for r in rs]):>30}")
    if runs.get("plain"):
        print(f"(median of all plain runs: "
              f"{statistics.median(r['out_tok_s'] for r in runs['plain']):,.0f} tok/s)")
    engine.shutdown()
    return runs


if __name__ == "__main__":
    main()
