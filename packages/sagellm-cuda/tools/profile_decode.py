"""Where a step's time goes on the bench model: graph replay vs engine step, kernel breakdown.

    python packages/sagellm-cuda/tools/profile_decode.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.sampling_params import SamplingParams
from sagellm_cuda.plugin import CudaPlatform


def main(model: str, out: str) -> None:
    cfg = EngineConfig(model=model, load_format="dummy", max_model_len=4096, num_kv_blocks=24000)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, platform=CudaPlatform(0))
    res: dict[str, object] = {"engine_s": time.perf_counter() - t0,
                              "capture_s": engine.runner.capture_seconds}
    runner = engine.runner
    free, total = torch.cuda.mem_get_info()
    params = {id(p): p for p in engine.model.parameters()}
    buffers = {b.data_ptr(): b for b in engine.model.buffers()}
    kv_bytes = engine.kv.get_memory_usage().bytes_total
    res["memory_gib"] = {k: v / 2**30 for k, v in {
        "total": total, "used": total - free,
        "torch_allocated": torch.cuda.memory_allocated(),
        "torch_reserved": torch.cuda.memory_reserved(),
        "weights": sum(p.numel() * p.element_size() for p in params.values()),
        "buffers": sum(b.numel() * b.element_size() for b in buffers.values()),
        "kv_pool": kv_bytes,
        "activation_profile": engine._profile_activation_bytes(),
    }.items()}
    m = res["memory_gib"]
    m["non_torch"] = m["used"] - m["torch_reserved"]
    print("memory GiB:", {k: round(v, 3) for k, v in m.items()})
    rng = np.random.default_rng(1)
    rows = []
    for bs in (1, 8, 16, 64, 256):
        for _ in range(bs):
            engine.add_request(rng.integers(100, 49000, 512).tolist(),
                               SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        while any(s.num_computed_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        step_ms = []
        for _ in range(20):
            t = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - t) * 1e3)
        g = runner.graphs[runner._padded(bs)]
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        replay = e0.elapsed_time(e1) / 20
        rows.append({"batch": bs, "graph_ms": replay, "step_ms_median": statistics.median(step_ms)})
        while engine.has_unfinished_requests():
            engine.step()
    res["decode"] = rows
    # Kernel breakdown of one eager decode step at batch 1 and one 512-token prefill.
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(rng.integers(100, 49000, 512).tolist(),
                       SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    plan = engine.scheduler.schedule()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.execute(plan)
        torch.cuda.synchronize()
    engine.scheduler.commit(plan)
    res["prefill_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    for seq in plan.sampling_seqs():
        seq.append_token(1)
    plan = engine.scheduler.schedule()
    graphs, runner.graphs = runner.graphs, {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.execute(plan)
        torch.cuda.synchronize()
    runner.graphs = graphs
    res["decode_kernels_bs1"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    # 512-token prefill forward alone (GPU time).
    t = []
    for _ in range(5):
        torch.cuda.synchronize()
        a = time.perf_counter()
        engine.add_request(rng.integers(100, 49000, 512).tolist(),
                           SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        t.append((time.perf_counter() - a) * 1e3)
    res["ttft_ms"] = t
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(res["prefill_kernels"])
    print(res["decode_kernels_bs1"])
    print(f"engine {res['engine_s']:.1f} s, capture {res['capture_s']:.1f} s, ttft ms {[round(x, 2) for x in t]}")
    for r in rows:
        print(f"decode batch {r['batch']:>4}: graph {r['graph_ms']:.3f} ms, engine step {r['step_ms_median']:.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
