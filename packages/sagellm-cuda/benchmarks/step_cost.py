"""What one decode step costs with each OpenAI feature on every request: 16 concurrent requests
through the offline engine, once plain (greedy) and once each with a small JSON schema,
presence/frequency/repetition penalties, and logprobs=5 (the rows of gpu_api_cost.sh).

Prints, per variant, the mean and p50 wall time of the steps in which all requests decode
(no prefill, none finished), its ratio to plain, and a torch.profiler top-15 table of a few
such steps. Runs on the GPU (CUDA graphs) or on the CPU with a tiny random model:

    python3 packages/sagellm-cuda/benchmarks/step_cost.py --model .benchmodel/qwen2.5-1.5b-arch
    python3 packages/sagellm-cuda/benchmarks/step_cost.py --tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def variants() -> dict[str, dict[str, object]]:
    from sagellm.bench.features import feature_variants

    return feature_variants()


def build_engine(args: argparse.Namespace, model: str):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    kw: dict[str, object] = dict(model=model, max_model_len=args.max_model_len,
                                 max_num_seqs=max(16, args.num_requests))
    if args.tiny:
        kw.update(backend="cpu", dtype="float32", block_size=4, num_kv_blocks=2048)
    else:
        kw.update(backend=args.backend, load_format=args.load_format,
                  quantization=args.quantization)
    return LLMEngine(EngineConfig(**kw))  # type: ignore[arg-type]


def run_variant(engine, name: str, extra: dict[str, object], args: argparse.Namespace
                ) -> tuple[list[float], str]:  # type: ignore[no-untyped-def]
    from sagellm.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = min(engine.vocab_size, 32000)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, **extra)
    for _ in range(args.num_requests):
        engine.add_request(torch.randint(10, vocab, (args.input_len,), generator=g).tolist(), params)
    times: list[float] = []
    table = ""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    step = 0
    while engine.has_unfinished_requests():
        plan_has_prefill = any(s.num_output_tokens == 0 for s in engine._seqs.values())  # noqa: SLF001
        profile = step == args.profile_at and not plan_has_prefill
        if profile:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(args.profile_steps):
                    engine.step()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15) + \
                (prof.key_averages().table(sort_by=sort, row_limit=15) if sort != "self_cpu_time_total" else "")
            step += args.profile_steps
            if args.cprofile:
                import cProfile
                import io
                import pstats

                pr = cProfile.Profile()
                sync()
                pr.enable()
                for _ in range(args.profile_steps):
                    engine.step()
                sync()
                pr.disable()
                buf = io.StringIO()
                stats = pstats.Stats(pr, stream=buf)
                stats.sort_stats("tottime").print_stats(25)
                buf.write("\n... by cumulative time:\n")
                stats.sort_stats("cumulative").print_stats(40)
                table += "\ncProfile, " + f"{args.profile_steps} steps, by own time:\n" + buf.getvalue()
                step += args.profile_steps
            continue
        sync()
        t0 = time.perf_counter()
        outs = engine.step()
        sync()
        dt = time.perf_counter() - t0
        if not plan_has_prefill and outs and not any(o.finished for o in outs) \
                and len(outs) == args.num_requests:
            times.append(dt)
        for o in outs:
            if o.error:
                raise RuntimeError(f"{name}: {o.error}")
        step += 1
    return times, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (weights not needed with --load-format dummy)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU backend")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--quantization", default="none", help="as EngineConfig.quantization")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--profile-at", type=int, default=40, help="step at which to profile")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--cprofile", action="store_true", help="also a Python profile of a few steps")
    ap.add_argument("--variants", default="plain,json_schema,penalties,logprobs5")
    args = ap.parse_args()
    if args.tiny:
        from sagellm.testing.tiny_model import make_tiny_llama

        model = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", tokenizer=True))
        if args.input_len == 512:
            args.input_len, args.output_len, args.profile_at = 16, 24, 6
            args.max_model_len = 256
    elif args.model:
        model = args.model
    else:
        ap.error("give --model DIR or --tiny")
    engine = build_engine(args, model)
    table = variants()
    warm = dict(args.__dict__, num_requests=2, output_len=8, profile_at=-1)
    results: dict[str, tuple[float, float, int]] = {}
    for name in args.variants.split(","):
        run_variant(engine, name, table[name], argparse.Namespace(**warm))  # warm (and compile)
        times, prof = run_variant(engine, name, table[name], args)
        if not times:
            raise SystemExit(f"{name}: no all-decode steps were timed")
        results[name] = (statistics.mean(times) * 1e3, statistics.median(times) * 1e3, len(times))
        print(f"\n=== {name}: decode step mean {results[name][0]:.3f} ms, p50 "
              f"{results[name][1]:.3f} ms over {len(times)} steps ===")
        print(prof)
    base = results.get("plain")
    print(f"\n{'variant':<12}{'mean ms':>10}{'p50 ms':>10}{'steps':>8}{'x plain':>10}")
    for name, (mean, p50, n) in results.items():
        ratio = base[1] / p50 if base else float("nan")
        print(f"{name:<12}{mean:>10.3f}{p50:>10.3f}{n:>8}{ratio:>10.3f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
