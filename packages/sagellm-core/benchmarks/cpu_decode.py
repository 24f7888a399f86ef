"""CPU speed of sageLLM (per weight format) versus transformers ``generate()`` on the same model.

    python packages/sagellm-core/benchmarks/cpu_decode.py [--threads 2] [--repeats 3]
        [--formats none,bf16,int8,int4] [--llama-cpp-site DIR] [--ttft-only]
        [--out results/cpu-decode-DATE.json]

The embedded SmolLM2-135M-Instruct (one GGUF file; transformers reads its dequantized float32
weights), greedy, ``ignore_eos``, after a warm-up, median of ``--repeats`` runs (min and max
kept too):

* TTFT: a 512-token prompt, one output token (fresh prompt each run: no prefix-cache hits);
* decode at batch 1: ``(tokens - 1) / (e2e - TTFT)`` over ``--tokens`` output tokens;
* 8 concurrent: ``8 * tokens / e2e`` for 8 different prompts submitted together (aggregate).

``--ttft-only`` measures the first row alone (prefill work, a few minutes less on a busy box).

sageLLM formats: ``none`` (float32 weights), ``bf16`` (``dtype=bfloat16``), ``int8`` / ``int4``
(``quantization=``, activations float32 around bfloat16 kernels). llama.cpp
(``cpu_decode_llama_cpp.py``, optional: skipped with a message where ``llama_cpp`` does not
import) runs the same GGUF file, the same token ids, the same thread count.

On a shared machine the wall-clock numbers swing: read min/max, and re-run on a quiet box before
quoting them. The JSON keeps the load average before and after, and each TTFT's process CPU
seconds too (less sensitive to other processes than wall time, though not immune).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _prompt(tok: Any, n: int, salt: int) -> list[int]:
    base = tok(f"Record {salt}. " + "The quick brown fox jumps over the lazy dog. " * (n // 8 + 8)
               ).input_ids
    return base[:n]


def _cpu_s() -> float:
    return time.process_time()


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_sagellm(fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    from sagellm import LLM, SamplingParams

    kwargs: dict[str, Any] = {"quantization": "none" if fmt in ("none", "bf16") else fmt}
    if fmt == "bf16":
        kwargs["dtype"] = "bfloat16"
    llm = LLM(model=None, **kwargs)
    tok = llm.tokenizer
    salt = iter(range(10**6))

    def run(prompts: list[list[int]], n: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    return _measure(lambda p, n: run(p, n), lambda: _prompt(tok, args.prompt_tokens, next(salt)),
                    lambda: _prompt(tok, 40, next(salt)), args)


def bench_transformers(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    model_dir = gguf_to_hf_dir(default_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    salt = iter(range(10**6))

    def run(prompts: list[list[int]], n: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    return _measure(run, lambda: _prompt(tok, args.prompt_tokens, next(salt)),
                    lambda: _prompt(tok, 40, next(salt)), args)


def bench_llama_cpp(args: argparse.Namespace) -> dict[str, Any] | None:
    from cpu_decode_llama_cpp import LlamaCppGreedy, import_llama_cpp
    from transformers import AutoTokenizer

    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    lib = import_llama_cpp(args.llama_cpp_site)
    if lib is None:
        return None
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(gguf_to_hf_dir(path))
    eng = LlamaCppGreedy(lib, str(path), args.threads)
    salt = iter(range(10**6))

    def run(prompts: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        eng.generate(prompts, n)
        return time.perf_counter() - t

    try:
        r = _measure(run, lambda: _prompt(tok, args.prompt_tokens, next(salt)),
                     lambda: _prompt(tok, 40, next(salt)), args)
    finally:
        eng.close()
    r["version"] = getattr(lib, "__version__", "?")
    return r


def _measure(run: Any, long_prompt: Any, short_prompt: Any, args: argparse.Namespace
             ) -> dict[str, Any]:
    n = args.tokens
    run([short_prompt()], 4)  # warm-up
    run([long_prompt()], 1)
    ttft, ttft_cpu, b1, b8 = [], [], [], []
    for _ in range(args.repeats):
        c = _cpu_s()
        ttft.append(run([long_prompt()], 1))
        ttft_cpu.append(_cpu_s() - c)
        if args.ttft_only:
            continue
        p = short_prompt()
        first = run([p], 1)
        e2e = run([short_prompt()], n)
        b1.append((n - 1) / max(e2e - first, 1e-9))
        prompts = [short_prompt() for _ in range(8)]
        b8.append(8 * n / run(prompts, n))
    if args.ttft_only:
        return {"ttft_512_s": _stats(ttft), "ttft_512_cpu_s": _stats(ttft_cpu)}
    return {"ttft_512_s": _stats(ttft), "ttft_512_cpu_s": _stats(ttft_cpu),
            "decode_b1_tok_s": _stats(b1),
            "aggregate_b8_tok_s": _stats(b8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="none,bf16,int8,int4")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-cpp-site", default=None,
                    help="a folder holding llama_cpp (a pip --target); unset: the environment's")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--ttft-only", action="store_true",
                    help="the 512-token TTFT alone (no decode or concurrent rows)")
    ap.add_argument("--out", default=None, help="default: results/cpu-decode-<today>.json")
    args = ap.parse_args()
    today = datetime.date.today().isoformat()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: dict[str, dict[str, Any]] = {}
    for fmt in args.formats.split(","):
        rows[f"sagellm ({fmt})"] = bench_sagellm(fmt, args)
        print(f"{fmt}: {rows[f'sagellm ({fmt})']}", flush=True)
    if not args.no_transformers:
        rows["transformers generate() (fp32)"] = bench_transformers(args)
        print(f"transformers: {rows['transformers generate() (fp32)']}", flush=True)
    if not args.no_llama_cpp:
        llama = bench_llama_cpp(args)
        if llama is not None:
            rows["llama.cpp (Q4_1, as shipped)"] = llama
            print(f"llama.cpp: {llama}", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {torch.get_num_threads()} threads, greedy, median of "
          f"{args.repeats} [min-max]; {args.tokens} output tokens\n")
    print(f"| engine (weights) | TTFT, {args.prompt_tokens}-token prompt | decode, batch 1 | "
          f"8 concurrent, aggregate |\n|---|---|---|---|")
    for name, r in rows.items():
        if args.ttft_only:
            t, c = r["ttft_512_s"], r["ttft_512_cpu_s"]
            print(f"| {name} | {t['median']:.2f} s [{t['min']:.2f}-{t['max']:.2f}], "
                  f"CPU {c['median']:.2f} s | - | - |")
            continue
        t, d, a = r["ttft_512_s"], r["decode_b1_tok_s"], r["aggregate_b8_tok_s"]
        print(f"| {name} | {t['median']:.2f} s [{t['min']:.2f}-{t['max']:.2f}] | "
              f"{d['median']:.1f} tok/s [{d['min']:.1f}-{d['max']:.1f}] | "
              f"{a['median']:.1f} tok/s [{a['min']:.1f}-{a['max']:.1f}] |")
    ratios = {}
    for ref_name, label in (("transformers generate() (fp32)", "transformers"),
                            ("llama.cpp (Q4_1, as shipped)", "llama.cpp")):
        ref = rows.get(ref_name)
        if not ref or args.ttft_only:
            continue
        for name, r in rows.items():
            if name.startswith("sagellm"):
                b1 = r["decode_b1_tok_s"]["median"] / ref["decode_b1_tok_s"]["median"]
                b8 = r["aggregate_b8_tok_s"]["median"] / ref["aggregate_b8_tok_s"]["median"]
                ttft = r["ttft_512_s"]["median"] / ref["ttft_512_s"]["median"]
                ratios[f"{name} / {label}"] = {"decode_b1": b1, "aggregate_b8": b8, "ttft_512": ttft}
                print(f"{name}: {b1:.2f}x {label} at batch 1, {b8:.2f}x at 8 concurrent, "
                      f"TTFT {ttft:.2f}x of {label}'s")
    out = Path(args.out or HERE / "results" / f"cpu-decode-{today}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": today, "model": "SmolLM2-135M-Instruct (embedded GGUF, Q4_1)",
        "note": "shared 2-core machine (other jobs running): wall-clock numbers are noisy",
        "load_average_before": load_before, "ratios_of_medians": ratios,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "output_tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "load_average_after": os.getloadavg(), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
