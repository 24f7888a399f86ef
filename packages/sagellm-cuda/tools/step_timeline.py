"""Where the time of a decode step goes on the GPU: the kernel timeline of steady decode steps
(asynchronous scheduling as configured), and the host work the device waited for.

For each case (``--cases``: ``plain1`` one greedy request, ``plain16`` sixteen, ``json16``
sixteen with the small JSON schema of ``sagellm.bench.features``, ``penalties16``,
``logprobs16``) it runs the requests to steady decode, then records ``--steps`` engine steps
with the torch profiler (CPU and CUDA, engine phases labelled) and prints:

* the wall time per step between ``engine.step()`` returns (no synchronization between steps),
* kernels per step, kernel time per step, the device's idle time inside the window and its
  largest gaps with the host phases running at the time,
* the kernels by total time (mean duration, count per step),

and writes a JSON summary (and ``--trace``: a gzipped Chrome trace per case). With ``--gemv``
it also times the model's linear shapes as ``torch.nn.functional.linear`` (cuBLAS) at 1 and 16
rows, rotating weight copies so that L2 does not hold them, and reports the bandwidth.

    python3 packages/sagellm-cuda/tools/step_timeline.py --model .benchmodel/qwen2.5-1.5b-arch \
        --out timeline.json [--trace DIR] [--gemv]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

#: Engine methods labelled in the trace: (module, class or None, attribute, label).
PHASES = [
    ("sagellm.engine.scheduler", "Scheduler", "schedule", "phase:schedule"),
    ("sagellm.engine.llm_engine", "LLMEngine", "_advance_each", "phase:advance"),
    ("sagellm.engine.step_launch", "StepLaunch", "result", "phase:wait_result"),
    ("sagellm.engine.mask_fill", "MaskFill", "take", "phase:mask_take"),
    ("sagellm.engine.mask_fill", None, "_fill", "phase:mask_fill_worker"),
    ("sagellm.engine.model_runner", "ModelRunner", "sample_tokens", "phase:sample_tokens"),
    ("sagellm_cuda.graphs", "CudaGraphModelRunner", "launch", "phase:launch"),
]


def label_phases() -> None:
    import importlib

    for mod_name, cls_name, attr, label in PHASES:
        mod = importlib.import_module(mod_name)
        owner = getattr(mod, cls_name) if cls_name else mod
        fn = getattr(owner, attr)

        def wrap(fn=fn, label=label):  # type: ignore[no-untyped-def]
            @functools.wraps(fn)
            def inner(*a, **k):  # type: ignore[no-untyped-def]
                with record_function(label):
                    return fn(*a, **k)
            return inner

        # MaskFill submits the module-level ``_fill`` by name, so patching the module works.
        setattr(owner, attr, wrap())


def cases() -> dict[str, tuple[int, dict[str, object]]]:
    from sagellm.bench.features import feature_variants

    v = feature_variants()
    return {"plain1": (1, v["plain"]), "plain16": (16, v["plain"]), "json16": (16, v["json_schema"]),
            "penalties16": (16, v["penalties"]), "logprobs16": (16, v["logprobs5"])}


def kernel_events(prof: profile) -> list[tuple[float, float, str]]:
    out = []
    for e in prof.events():
        # Labels (record_function) also get a device-side span: not kernels.
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0 \
                and not e.name.startswith("phase:"):
            out.append((e.time_range.start, e.time_range.end, e.name))
    out.sort()
    return out


def phase_events(prof: profile) -> list[tuple[float, float, str]]:
    # Host side only: a label's device-side span has the same name.
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CPU
                  and (e.name.startswith("phase:") or e.name in (
                      "cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize",
                      "cudaMemcpyAsync", "cudaGraphLaunch")))


def summarize(kern: list[tuple[float, float, str]], phases: list[tuple[float, float, str]],
              steps: int) -> dict[str, object]:
    if not kern:
        return {"error": "no kernels recorded"}
    t0, t1 = kern[0][0], max(e for _, e, _ in kern)
    busy = 0.0
    gaps: list[tuple[float, float, float]] = []
    cur_s, cur_e = kern[0][0], kern[0][1]
    for s, e, _ in kern[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    by_name: dict[str, list[float]] = {}
    for s, e, n in kern:
        by_name.setdefault(n, []).append(e - s)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    big = sorted(gaps, reverse=True)[:12]
    gap_rows = []
    for d, gs, ge in big:
        during = sorted({n for s, e, n in phases if s < ge and e > gs})
        gap_rows.append({"us": round(d, 1), "during": during})
    idle = sum(d for d, _, _ in gaps)
    return {
        "window_us": t1 - t0, "kernel_busy_us_per_step": busy / steps,
        "kernels_per_step": len(kern) / steps, "idle_us_per_step": idle / steps,
        "idle_in_gaps_over_20us_per_step": sum(d for d, _, _ in gaps if d > 20) / steps,
        "small_gaps_us_per_step": sum(d for d, _, _ in gaps if d <= 20) / steps,
        "top_kernels": [{"name": n[:90], "us_mean": statistics.mean(v), "per_step": len(v) / steps,
                         "us_per_step": sum(v) / steps} for n, v in top],
        "largest_gaps": gap_rows,
        "phase_us_per_step": {n: sum(e - s for s, e, m in phases if m == n) / steps
                              for n in sorted({m for _, _, m in phases})},
    }


def run_case(engine, name: str, rows: int, extra: dict[str, object], args: argparse.Namespace,
             trace_dir: Path | None) -> dict[str, object]:  # type: ignore[no-untyped-def]
    from sagellm.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = min(engine.vocab_size, 32000)
    params = SamplingParams(max_tokens=args.warm_steps + args.steps + 40, temperature=0.0,
                            ignore_eos=True, **extra)
    for _ in range(rows):
        engine.add_request(torch.randint(10, vocab, (args.input_len,), generator=g).tolist(), params)
    for _ in range(args.warm_steps):
        engine.step()
    torch.cuda.synchronize()
    # Wall time per step, nothing synchronized between steps.
    marks = [time.perf_counter()]
    for _ in range(args.steps):
        engine.step()
        marks.append(time.perf_counter())
    wall = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    res = summarize(kernel_events(prof), phase_events(prof), args.steps)
    res["wall_ms_p50"] = statistics.median(wall)
    res["wall_ms_mean"] = statistics.mean(wall)
    if trace_dir is not None:
        raw = trace_dir / f"{name}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    while engine.has_unfinished_requests():
        for rid in list(engine._seqs):  # noqa: SLF001
            engine.abort_request(rid)
        engine.step()
    return res


def time_linears(model_dir: str) -> list[dict[str, object]]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", h // heads)
    shapes = {"qkv": ((heads + 2 * kv) * hd, h), "o": (h, heads * hd), "gate_up": (2 * inter, h),
              "down": (h, inter), "lm_head": (cfg["vocab_size"], h)}
    rows = []
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-200 * 2**20 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for w in ws:
                torch.nn.functional.linear(x, w)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in ws:
                    torch.nn.functional.linear(x, w)
            graph.replay()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                graph.replay()
            b.record()
            torch.cuda.synchronize()
            us = a.elapsed_time(b) * 1e3 / (10 * copies)
            rows.append({"shape": name, "n": n, "k": k, "m": m, "us": us,
                         "gb_s": (nbytes + m * k * 2 + m * n * 2) / us / 1e3})
        del ws
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="plain1,plain16,json16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm-steps", type=int, default=30)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--trace", help="directory for gzipped Chrome traces")
    ap.add_argument("--gemv", action="store_true")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                    help="extra EngineConfig field, e.g. async_scheduling=false")
    args = ap.parse_args()
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    label_phases()
    kw: dict[str, object] = dict(model=args.model, load_format="dummy", max_model_len=4096,
                                 backend="cuda")
    for item in args.engine_arg:
        key, _, val = item.partition("=")
        kw[key] = json.loads(val)
    engine = LLMEngine(EngineConfig(**kw))  # type: ignore[arg-type]
    trace_dir = Path(args.trace) if args.trace else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)
    table = cases()
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "async_scheduling": engine.async_scheduling, "cases": {}}
    for name in args.cases.split(","):
        rows, extra = table[name]
        res = run_case(engine, name, rows, extra, args, trace_dir)
        out["cases"][name] = res  # type: ignore[index]
        print(f"\n=== {name}: wall {res['wall_ms_p50']:.3f} ms/step p50, kernels "
              f"{res['kernel_busy_us_per_step']:.0f} us/step ({res['kernels_per_step']:.0f} "
              f"launches), device idle {res['idle_us_per_step']:.0f} us/step "
              f"({res['idle_in_gaps_over_20us_per_step']:.0f} in gaps > 20 us)")
        for k in res["top_kernels"][:14]:  # type: ignore[index]
            print(f"  {k['us_per_step']:8.1f} us/step {k['per_step']:6.1f}x {k['us_mean']:7.2f} us  {k['name']}")
        print("  largest gaps:", res["largest_gaps"][:6])
        print("  host phases us/step:", {k: round(v) for k, v in res["phase_us_per_step"].items()})
    engine.shutdown()
    if args.gemv:
        out["linears"] = rows = time_linears(args.model)
        for r in rows:
            print(f"  linear {r['shape']:<8} N={r['n']:<7} K={r['k']:<6} M={r['m']:<3} "
                  f"{r['us']:7.2f} us {r['gb_s']:7.0f} GB/s")
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
