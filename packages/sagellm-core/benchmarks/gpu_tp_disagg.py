"""Two-GPU checks and numbers for tensor parallelism and prefill/decode disaggregation (issue 5).

Run on a machine with two CUDA GPUs, from the repository root::

    python packages/sagellm-core/benchmarks/gpu_tp_disagg.py \\
        --model ../shared/bench/models/qwen2.5-1.5b-arch --out $OUT/gpu_tp_disagg.json

Parts (``--parts``, default all, in this order):

``allreduce``  ``CommBackend.all_reduce`` of 1 GiB bf16 over NCCL between two processes: algorithm
               and bus bandwidth (bus = alg * 2 (n-1) / n), plus the latency of decode-sized
               all-reduces (what limits decode-time tensor parallelism).
``tp``         TP=2 with NCCL against TP=1 on the same random bf16 checkpoint (written once to a
               temp dir: the dummy loader is not TP-invariant): first-step logits (max |diff|,
               relative to max |logit|, top-1 agreement) and greedy tokens; then batch16 decode
               throughput at TP=1 and TP=2 (both eager, same settings).
``serve``      serve_c16 (../shared/bench/README.md: 16 closed-loop clients, 64 requests, 512-token
               random prompts, 256 tokens, ignore_eos, greedy) driven through the OFFLINE engine
               (``LLMEngine.add_request``/``step``; no HTTP), colocated on GPU 0 and disaggregated
               (decode on GPU 0, prefill on GPU 1): TTFT p50/p99, TPOT p50/p99, ITL p50/p99,
               output tok/s, and the KV transfer bandwidth.
``crash``      TP=2 over NCCL, worker rank 1 SIGKILLed mid-generation: seconds until the engine
               raises ``WorkerFailure`` (a hang is reported after 90 s and the script exits).

The platform is ``sagellm_cuda.plugin:CudaPlatform`` when importable (installed or found under
``packages/``), else a minimal torch-only CUDA platform defined here (``--platform torch``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
for _src in sorted(ROOT.glob("packages/*/src")):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(p) for p in sorted(ROOT.glob("packages/*/src"))] + [os.environ.get("PYTHONPATH", "")])
# Never NVLink multicast on shared machines.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sagellm.backends.torch_attention import TorchAttentionBackend  # noqa: E402
from sagellm.backends.torch_comm import TorchDistributedComm  # noqa: E402
from sagellm.backends.torch_kv import TorchKVBackend  # noqa: E402
from sagellm.protocols import (  # noqa: E402
    Availability,
    Capabilities,
    KVCacheSpec,
    MemoryInfo,
    Platform,
)
from sagellm.sampling_params import SamplingParams  # noqa: E402


class TorchCudaPlatform(Platform):
    """Fallback: core's torch attention and KV pool on CUDA, NCCL with exact (synced) timings."""

    name = "torch-cuda"
    device_type = "cuda"

    @classmethod
    def is_available(cls) -> Availability:
        return Availability.yes() if torch.cuda.is_available() else Availability.no("no CUDA")

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(dtypes=(torch.bfloat16, torch.float16, torch.float32),
                            default_dtype=torch.bfloat16, dist_backend="nccl")

    def set_device(self) -> None:
        torch.cuda.set_device(self.device_index)

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.device_index)
        return MemoryInfo(free, total)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device_index)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device_index)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device_index)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device_index)

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> TorchKVBackend:
        return TorchKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> TorchAttentionBackend:
        return TorchAttentionBackend()

    def make_comm_backend(self, rank: int, world_size: int) -> TorchDistributedComm:
        return TorchDistributedComm(self.device, sync=True, synchronize=self.synchronize)


def platform_class(choice: str) -> type[Platform]:
    if choice in ("auto", "cuda"):
        try:
            from sagellm_cuda.plugin import CudaPlatform

            return CudaPlatform  # type: ignore[no-any-return]
        except Exception as exc:
            if choice == "cuda":
                raise
            print(f"[platform] sagellm_cuda not importable ({exc}); using the torch fallback")
    return TorchCudaPlatform


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


def random_prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 49000, size=length).tolist()


def make_engine(platform_cls: type[Platform], **kw: Any):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    config = EngineConfig(**kw)
    return LLMEngine(config, platform=platform_cls(config.device_index))


def drop(engine: Any) -> None:
    """Stop an engine's workers. The caller must then ``del`` its own reference and call
    :func:`release`, or the engine's KV pool stays allocated."""
    engine.shutdown()


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# all_reduce bandwidth
# --------------------------------------------------------------------------------------------


def _allreduce_rank(rank: int, platform_cls: type[Platform], port: int, queue: Any) -> None:
    import torch.distributed as dist

    plat = platform_cls(rank)
    plat.set_device()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    comm = plat.make_comm_backend(rank, 2)
    out: dict[str, Any] = {}
    x = torch.ones(1 << 29, dtype=torch.bfloat16, device=plat.device)  # 1 GiB
    for _ in range(5):
        comm.all_reduce(x)
    torch.cuda.synchronize()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(x)
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / iters
    alg = x.numel() * 2 / secs / 1e9
    out["1GiB"] = {"ms": secs * 1e3, "algbw_GBps": alg, "busbw_GBps": alg * 2 * (2 - 1) / 2}
    for tokens in (1, 16, 256):
        y = torch.ones(tokens, 1536, dtype=torch.bfloat16, device=plat.device)
        for _ in range(20):
            comm.all_reduce(y)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            comm.all_reduce(y)
        torch.cuda.synchronize()
        out[f"latency_us_{tokens}x1536"] = (time.perf_counter() - t0) / 200 * 1e6
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def part_allreduce(platform_cls: type[Platform]) -> dict[str, Any]:
    import socket

    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, platform_cls, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    r = res["1GiB"]
    print(f"[allreduce] 1 GiB bf16: {r['ms']:.2f} ms, algbw {r['algbw_GBps']:.1f} GB/s, "
          f"busbw {r['busbw_GBps']:.1f} GB/s; latency 1x1536 {res['latency_us_1x1536']:.1f} us, "
          f"16x1536 {res['latency_us_16x1536']:.1f} us, 256x1536 {res['latency_us_256x1536']:.1f} us")
    return res


# --------------------------------------------------------------------------------------------
# TP=2 == TP=1
# --------------------------------------------------------------------------------------------


def write_random_checkpoint(model_dir: Path, out: Path, std: float = 0.02) -> Path:
    """Random bf16 weights for the config in ``model_dir`` (Llama/Qwen2 names), saved once."""
    import shutil

    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or h // nh
    qkv_bias = cfg.get("model_type") == "qwen2"
    g = torch.Generator(device="cuda").manual_seed(1234)

    def rnd(*shape: int, s: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * s).to(torch.bfloat16).cpu()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(v, h),
                                  "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = rnd(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(nh * d, h)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * d, h)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * d, h)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = rnd(nh * d, s=0.1)
            t[p + "self_attn.k_proj.bias"] = rnd(nkv * d, s=0.1)
            t[p + "self_attn.v_proj.bias"] = rnd(nkv * d, s=0.1)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nh * d)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        t[p + "mlp.up_proj.weight"] = rnd(inter, h)
        t[p + "mlp.down_proj.weight"] = rnd(h, inter)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(t, str(out / "model.safetensors"))
    return out


def greedy_with_first_logits(engine: Any, prompts: list[list[int]], max_tokens: int
                             ) -> tuple[list[list[int]], torch.Tensor]:
    captured: list[torch.Tensor] = []
    model = engine.model
    inner = model.compute_logits

    def spy(hidden: torch.Tensor) -> torch.Tensor:
        out = inner(hidden)
        if not captured:
            captured.append(out.float().cpu())
        return out

    model.compute_logits = spy
    try:
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                    ignore_eos=True)) for p in prompts]
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
    finally:
        del model.compute_logits
    return [done[i] for i in ids], captured[0]


def decode_throughput(engine: Any, n: int = 16, prompt_len: int = 512, max_tokens: int = 128
                      ) -> float:
    engine.add_request(random_prompt(1, 16), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i in range(n):
        engine.add_request(random_prompt(2000 + i, prompt_len),
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += len(engine.step())
    return tokens / (time.perf_counter() - t0)


def part_tp(platform_cls: type[Platform], model_dir: Path, ckpt_dir: Path) -> dict[str, Any]:
    ckpt = ckpt_dir if (ckpt_dir / "model.safetensors").exists() else write_random_checkpoint(
        model_dir, ckpt_dir)
    prompts = [random_prompt(100 + i, 64 + 40 * i) for i in range(8)]
    common = dict(model=str(ckpt), dtype="bfloat16", max_model_len=4096,
                  gpu_memory_utilization=0.6, enforce_eager=True)
    res: dict[str, Any] = {}
    for tp in (1, 2):
        t0 = time.perf_counter()
        eng = make_engine(platform_cls, tensor_parallel_size=tp, **common)
        start = time.perf_counter() - t0
        toks, logits = greedy_with_first_logits(eng, prompts, 32)
        tput = decode_throughput(eng)
        res[f"tp{tp}"] = {"tokens": toks, "logits": logits, "startup_s": start,
                          "batch16_512_128_tok_s": tput}
        print(f"[tp] TP={tp}: start {start:.1f} s, batch16 (512 in, 128 out, eager) {tput:.0f} tok/s")
        drop(eng)
        del eng
        release()
    a, b = res["tp1"]["logits"], res["tp2"]["logits"]
    diff = (a - b).abs().max().item()
    rel = diff / a.abs().max().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    same_prefix = []
    for x, y in zip(res["tp1"]["tokens"], res["tp2"]["tokens"], strict=True):
        k = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        same_prefix.append(k)
    exact = sum(k == 32 for k in same_prefix)
    ok = top1 == 1.0 and rel < 0.05
    print(f"[tp] first-step logits TP2 vs TP1: max|diff| {diff:.4f} ({rel:.2%} of max|logit|), "
          f"top-1 agreement {top1:.0%}; greedy 32 tokens identical for {exact}/8 prompts, "
          f"matching prefix lengths {same_prefix} -> {'PASS' if ok else 'CHECK'} (bf16)")
    return {"max_abs_logit_diff": diff, "rel_logit_diff": rel, "top1_agreement": top1,
            "greedy_identical": exact, "prefix_lengths": same_prefix, "pass": ok,
            "tp1": {k: v for k, v in res["tp1"].items() if k not in ("tokens", "logits")},
            "tp2": {k: v for k, v in res["tp2"].items() if k not in ("tokens", "logits")}}


# --------------------------------------------------------------------------------------------
# serve_c16, engine-driven closed loop
# --------------------------------------------------------------------------------------------


def closed_loop(engine: Any, concurrency: int = 16, num_requests: int = 64, prompt_len: int = 512,
                max_tokens: int = 256) -> dict[str, Any]:
    engine.add_request(random_prompt(6999, 16), SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    recs: dict[str, dict[str, Any]] = {}
    nxt = 0

    def submit() -> None:
        nonlocal nxt
        rid = engine.add_request(random_prompt(7000 + nxt, prompt_len), params)
        recs[rid] = {"start": time.perf_counter(), "times": [], "counts": []}
        nxt += 1

    t0 = time.perf_counter()
    while nxt < min(concurrency, num_requests):
        submit()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            r = recs[o.request_id]
            r["times"].append(now)
            r["counts"].append(len(o.new_token_ids))
            if o.finished:
                r["end"] = now
                if nxt < num_requests:
                    submit()
    dur = time.perf_counter() - t0
    ttft, tpot, itl = [], [], []
    total = 0
    for r in recs.values():
        n = sum(r["counts"])
        total += n
        ttft.append((r["times"][0] - r["start"]) * 1e3)
        tpot.append((r["times"][-1] - r["times"][0]) * 1e3 / max(1, n - r["counts"][0]))
        itl += [(b - a) * 1e3 for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {"completed": len(recs), "duration_s": dur, "out_tok_s": total / dur,
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
            "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)}}


def part_serve(platform_cls: type[Platform], model_dir: Path) -> dict[str, Any]:
    common = dict(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  gpu_memory_utilization=0.85)
    out: dict[str, Any] = {}
    for name, extra in (("colocated", {}), ("disaggregated", {"disaggregate_prefill": True})):
        eng = make_engine(platform_cls, **common, **extra)
        r = closed_loop(eng)
        if eng.workers is not None:
            stats = eng.workers.comm.get_bandwidth_stats().as_dict()
            r["kv_transfer"] = stats.get("kv_transfer")
            r["recv_kv_blocks"] = stats.get("recv_kv_blocks")
            log = eng.runner.transfers
            r["kv_transfer_summary"] = {"prompts": log.num_transfers, "MiB": log.num_bytes / 2**20,
                                        "GBps": log.gbps,
                                        "ms_per_prompt": log.seconds * 1e3 / max(1, log.num_transfers)}
        out[name] = r
        drop(eng)
        del eng
        release()
    print("\n| serve_c16 (engine-driven, no HTTP) | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
          "ITL p50 | ITL p99 | out tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | "
              f"{r['tpot_ms']['p50']:.2f} | {r['tpot_ms']['p99']:.2f} | {r['itl_ms']['p50']:.2f} | "
              f"{r['itl_ms']['p99']:.2f} | {r['out_tok_s']:.0f} |")
    s = out["disaggregated"].get("kv_transfer_summary")
    if s:
        print(f"\n[serve] KV transfer prefill->decode: {s['prompts']} prompts, {s['MiB']:.0f} MiB, "
              f"{s['GBps']:.1f} GB/s end to end (device-synchronised), {s['ms_per_prompt']:.2f} ms "
              f"per 512-token prompt")
    return out


# --------------------------------------------------------------------------------------------
# crash handling under NCCL
# --------------------------------------------------------------------------------------------


def part_crash(platform_cls: type[Platform], ckpt_dir: Path, model_dir: Path) -> dict[str, Any]:
    from sagellm.distributed.launcher import WorkerFailure

    ckpt = ckpt_dir if (ckpt_dir / "model.safetensors").exists() else write_random_checkpoint(
        model_dir, ckpt_dir)
    eng = make_engine(platform_cls, model=str(ckpt), dtype="bfloat16", max_model_len=4096,
                      gpu_memory_utilization=0.5, tensor_parallel_size=2)
    pid = eng.workers.processes[1].pid
    for i in range(8):
        eng.add_request(random_prompt(300 + i, 256),
                        SamplingParams(max_tokens=3000, ignore_eos=True))
    for _ in range(5):
        eng.step()

    def hang_guard() -> None:
        time.sleep(90)
        print("[crash] HANG: no error 90 s after killing worker rank 1 (FAIL)", flush=True)
        os._exit(3)

    threading.Thread(target=hang_guard, daemon=True).start()
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    err = None
    try:
        while eng.has_unfinished_requests():
            eng.step()
    except WorkerFailure as exc:
        err = str(exc)
    secs = time.perf_counter() - t0
    print("[crash] worker rank 1 killed: " + (f"error after {secs:.2f} s: {err}" if err else "NO ERROR"))
    return {"seconds_to_error": secs, "error": err}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_model = next((p for p in (ROOT / "shared/bench/models/qwen2.5-1.5b-arch",
                                      ROOT.parent / "shared/bench/models/qwen2.5-1.5b-arch")
                          if p.exists()), None)
    ap.add_argument("--model", type=Path, default=default_model)
    ap.add_argument("--platform", default="auto", choices=["auto", "cuda", "torch"])
    ap.add_argument("--parts", default="allreduce,tp,serve,crash")
    ap.add_argument("--ckpt-dir", type=Path, default=Path(tempfile.gettempdir()) / "sagellm-tp-ckpt")
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", ".")) / "gpu_tp_disagg.json")
    args = ap.parse_args()
    if args.model is None:
        ap.error("--model: the qwen2.5-1.5b-arch directory (config.json) was not found")
    if torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs, found {torch.cuda.device_count()}")
        return 2
    platform_cls = platform_class(args.platform)
    card = torch.cuda.get_device_name(0)
    print(f"[env] {torch.cuda.device_count()} x {card}, torch {torch.__version__}, platform "
          f"{platform_cls.__module__}.{platform_cls.__name__}")
    results: dict[str, Any] = {"card": card, "num_gpus": torch.cuda.device_count(),
                               "platform": f"{platform_cls.__module__}.{platform_cls.__name__}"}
    parts = args.parts.split(",")
    steps = [("allreduce", lambda: part_allreduce(platform_cls)),
             ("tp", lambda: part_tp(platform_cls, args.model, args.ckpt_dir)),
             ("serve", lambda: part_serve(platform_cls, args.model)),
             ("crash", lambda: part_crash(platform_cls, args.ckpt_dir, args.model))]
    for name, fn in steps:
        if name not in parts:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # keep the other parts' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
