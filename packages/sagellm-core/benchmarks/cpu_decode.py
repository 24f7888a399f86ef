"""CPU speed of sageLLM (per weight format) versus transformers ``generate()`` on the same model.

    python packages/sagellm-core/benchmarks/cpu_decode.py [--threads 2] [--repeats 3]
        [--formats none,bf16,int8,int4] [--out results/cpu-decode-2026-12-01.json]

The embedded SmolLM2-135M-Instruct (one GGUF file; transformers reads its dequantized float32
weights), greedy, ``ignore_eos``, after a warm-up, median of ``--repeats`` runs (min and max
kept too):

* TTFT: a 512-token prompt, one output token (fresh prompt each run: no prefix-cache hits);
* decode at batch 1: ``(tokens - 1) / (e2e - TTFT)`` over ``--tokens`` output tokens;
* 8 concurrent: ``8 * tokens / e2e`` for 8 different prompts submitted together (aggregate).

sageLLM formats: ``none`` (float32 weights), ``bf16`` (``dtype=bfloat16``), ``int8`` / ``int4``
(``quantization=``, activations float32 around bfloat16 kernels). On a shared machine the
numbers swing: read min/max, and re-run on a quiet box before quoting them.
"""

from __future__ import annotations

import argparse
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


def _measure(run: Any, long_prompt: Any, short_prompt: Any, args: argparse.Namespace
             ) -> dict[str, Any]:
    n = args.tokens
    run([short_prompt()], 4)  # warm-up
    run([long_prompt()], 1)
    ttft, b1, b8 = [], [], []
    for _ in range(args.repeats):
        ttft.append(run([long_prompt()], 1))
        p = short_prompt()
        first = run([p], 1)
        e2e = run([short_prompt()], n)
        b1.append((n - 1) / max(e2e - first, 1e-9))
        prompts = [short_prompt() for _ in range(8)]
        b8.append(8 * n / run(prompts, n))
    return {"ttft_512_s": _stats(ttft), "decode_b1_tok_s": _stats(b1),
            "aggregate_b8_tok_s": _stats(b8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="none,bf16,int8,int4")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu-decode-2026-12-01.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    for fmt in args.formats.split(","):
        rows[f"sagellm ({fmt})"] = bench_sagellm(fmt, args)
        print(f"{fmt}: {rows[f'sagellm ({fmt})']}", flush=True)
    if not args.no_transformers:
        rows["transformers generate() (fp32)"] = bench_transformers(args)
    print(f"\nSmolLM2-135M-Instruct, {torch.get_num_threads()} threads, greedy, median of "
          f"{args.repeats} [min-max]; {args.tokens} output tokens\n")
    print(f"| engine (weights) | TTFT, {args.prompt_tokens}-token prompt | decode, batch 1 | "
          f"8 concurrent, aggregate |\n|---|---|---|---|")
    for name, r in rows.items():
        t, d, a = r["ttft_512_s"], r["decode_b1_tok_s"], r["aggregate_b8_tok_s"]
        print(f"| {name} | {t['median']:.2f} s [{t['min']:.2f}-{t['max']:.2f}] | "
              f"{d['median']:.1f} tok/s [{d['min']:.1f}-{d['max']:.1f}] | "
              f"{a['median']:.1f} tok/s [{a['min']:.1f}-{a['max']:.1f}] |")
    hf = rows.get("transformers generate() (fp32)")
    if hf:
        for name, r in rows.items():
            if name.startswith("sagellm"):
                print(f"{name}: {r['decode_b1_tok_s']['median'] / hf['decode_b1_tok_s']['median']:.2f}x "
                      f"transformers at batch 1, "
                      f"{r['aggregate_b8_tok_s']['median'] / hf['aggregate_b8_tok_s']['median']:.2f}x "
                      f"at 8 concurrent")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": "2026-12-01", "model": "SmolLM2-135M-Instruct (embedded GGUF, Q4_1)",
        "threads": torch.get_num_threads(), "repeats": args.repeats, "output_tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "load_average": os.getloadavg(), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
