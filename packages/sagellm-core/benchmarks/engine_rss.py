"""Does the engine keep anything per request? Host RSS of an ``LLMEngine`` over many requests.

24,000 requests (prompts of 8-120 tokens, 4-40 output tokens, half sampled with per-request
seeds, a third of them aborted mid-way) go through a tiny random Llama with a byte tokenizer on
the CPU, 64 at a time, with a KV pool small enough that the prefix cache is full early. RSS is
printed every 4,000 requests: a per-request leak shows as steady growth; warm-up as one step.

    python packages/sagellm-core/benchmarks/engine_rss.py [NUM_REQUESTS]
"""

from __future__ import annotations

import gc
import random
import sys
import tempfile

from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.sampling_params import SamplingParams
from sagellm.testing.tiny_model import make_tiny_llama


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(num_requests: int = 24_000, concurrency: int = 64) -> None:
    model = make_tiny_llama(tempfile.mkdtemp(), tokenizer=True, max_position_embeddings=512)
    engine = LLMEngine(EngineConfig(model=str(model), backend="cpu", num_kv_blocks=2048,
                                    max_num_seqs=concurrency))
    rng = random.Random(0)
    live: dict[str, bool] = {}  # request id -> to be aborted mid-way
    done = submitted = 0
    base: int | None = None
    next_report = 0
    while done < num_requests:
        while len(live) < concurrency:
            submitted += 1
            rid = f"r{submitted}"
            ids = [rng.randint(3, 255) for _ in range(rng.randint(8, 120))]
            params = SamplingParams(max_tokens=rng.randint(4, 40), ignore_eos=True,
                                    temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.choice([None, submitted]))
            engine.add_request(ids, params, rid)
            live[rid] = rng.random() < 0.33
        for out in engine.step():
            if out.finished:
                live.pop(out.request_id, None)
                done += 1
            elif live.get(out.request_id) and rng.random() < 0.1:
                engine.abort_request(out.request_id)
                live.pop(out.request_id)
                done += 1
        if done >= next_report:
            gc.collect()
            base = _rss() if base is None else base
            s = engine.get_stats()
            print(f"{done:6d} requests  RSS {_rss() / 2**20:6.1f} MiB (+{(_rss() - base) / 2**20:4.1f})"
                  f"  free KV blocks {s.num_free_kv_blocks}/{s.num_kv_blocks}", flush=True)
            next_report += 4000


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
