"""CPU decode speed of sageLLM versus transformers ``generate()`` on the same model and machine.

    python packages/sagellm-core/benchmarks/cpu_decode.py [--tokens 128] [--batch 1]

Both sides run fp32 greedy on the embedded SmolLM2 (identical dequantized weights), after a
warm-up; decode speed = (tokens - 1) / (e2e - time to first token).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from sagellm import LLM, SamplingParams
    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    model_dir = gguf_to_hf_dir(default_model_path())
    llm = LLM(model=None)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])
    n = args.tokens

    def ours(max_tokens: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([prompt] * args.batch, sp, use_tqdm=False)
        return time.perf_counter() - t

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt] * args.batch)

    def theirs(max_tokens: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                        min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    rows = []
    for name, fn in (("sagellm (cpu backend)", ours), ("transformers generate()", theirs)):
        fn(4)  # warm-up
        ttft = min(fn(1) for _ in range(3))
        e2e = min(fn(n) for _ in range(2))
        tpot = (e2e - ttft) / (n - 1)
        rows.append((name, ttft * 1e3, tpot * 1e3, args.batch / tpot))
    print(f"\nSmolLM2-135M fp32, prompt {len(prompt)} tokens, {n} output tokens, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'engine':<26}{'TTFT ms':>10}{'TPOT ms':>10}{'decode tok/s':>14}")
    for name, ttft, tpot, tps in rows:
        print(f"{name:<26}{ttft:>10.1f}{tpot:>10.2f}{tps:>14.1f}")
    print(f"ratio sagellm / transformers decode speed: {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
    main()
