"""``sagellm bench`` / ``python -m sagellm.bench``: run the workloads, write JSON, print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform as pyplatform
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sagellm.bench import report, soak

OFFLINE = ["ttft_512", "tpot_512_256", "batch8_512_256", "batch16_512_256", "nano256_random",
           "kv_fragmentation"]
#: Workloads that only talk to a running server (--serve-url), without an offline engine.
SERVE = ["serve_c1", "serve_c16", "serve_c64", "serve_mixed", "soak"]
#: Run only when named: one fresh engine per ``--kv-eviction`` policy.
PREFIX = ["prefix_chat"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory of the bench model (config only is "
                   "fine: weights are random); needed by the offline workloads")
    p.add_argument("--backend", default="auto")
    p.add_argument("--platform-class", default=None,
                   help="module:Class of a Platform to use instead of discovery (e.g. when the "
                        "backend is on PYTHONPATH but not installed)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--workloads", default="all",
                   help=f"comma list of {','.join(OFFLINE + SERVE + PREFIX)} (default all offline "
                        "ones, plus serve_c1,serve_c16 when --serve-url is given; serve_c64, "
                        "serve_mixed, soak and prefix_chat only when named)")
    p.add_argument("--serve-url", default=None, help="base URL of a running sagellm-server")
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="folder of baseline JSONs (per card: h100/vllm_offline.json ...)")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench.json"))
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default="none",
                   help="EngineConfig.quantization: the random weights quantized on load")
    p.add_argument("--serve-extra-body", type=json.loads, default=None, metavar="JSON",
                   help="JSON object merged into every serve workload request (e.g. "
                        "'{\"logprobs\": 5}'), to measure what a feature costs")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fixed KV pool size in blocks (small: prefix_chat evicts)")
    p.add_argument("--kv-eviction", default="lru,lfu,s3fifo",
                   help="comma list of eviction policies; prefix_chat runs once per policy, each "
                        "on a fresh engine (the other workloads use the first)")
    soak.add_arguments(p)


def _policies(args: argparse.Namespace) -> list[str]:
    return [p for p in args.kv_eviction.split(",") if p]


def _make_engine(args: argparse.Namespace, kv_eviction: str | None = None) -> Any:
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    config = EngineConfig(model=args.model, backend=args.backend, load_format="dummy",
                          dtype="auto", max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          enforce_eager=args.enforce_eager, num_kv_blocks=args.num_kv_blocks,
                          quantization=args.quantization,
                          kv_eviction=kv_eviction or _policies(args)[0])
    platform = None
    if args.platform_class:
        mod, _, cls = args.platform_class.partition(":")
        platform = getattr(importlib.import_module(mod), cls)(config.device_index)
    return LLMEngine(config, platform=platform)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = OFFLINE if args.workloads == "all" else args.workloads.split(",")
    if args.workloads == "all" and args.serve_url:
        names = names + ["serve_c1", "serve_c16"]
    result: dict[str, Any] = {"engine": "sagellm", "python": pyplatform.python_version()}
    if all(n in SERVE for n in names):
        return _run_serve_only(args, names, result)
    if all(n in PREFIX for n in names):
        if not args.model:
            raise ValueError("prefix_chat needs --model")
        t0 = time.perf_counter()
        result["prefix_chat"] = _prefix_sweep(args, result)
        result["total_s"] = time.perf_counter() - t0
        return result
    if not args.model:
        raise ValueError(f"the offline workloads ({', '.join(n for n in names if n not in SERVE)}) "
                         "need --model")
    from sagellm.bench import workloads

    t0 = time.perf_counter()
    engine = _make_engine(args)
    t_ready = time.perf_counter() - t0
    warm = workloads.warm_up(engine)
    result["startup"] = {"engine_ready_s": t_ready, "first_request_s": warm,
                         "to_first_request_s": time.perf_counter() - t0,
                         "graph_capture_s": getattr(engine.runner, "capture_seconds", None)}
    result["device"] = engine.platform.device_name()
    result["backend"] = engine.platform.name
    result["kv_capacity"] = workloads.kv_capacity(engine)
    table: dict[str, Callable[[], dict[str, Any]]] = {
        "ttft_512": lambda: workloads.ttft_512(engine),
        "tpot_512_256": lambda: workloads.tpot_512_256(engine),
        "batch8_512_256": lambda: workloads.batch_512_256(engine, 8, 3000),
        "batch16_512_256": lambda: workloads.batch_512_256(engine, 16, 3100),
        "nano256_random": lambda: workloads.nano256_random(engine),
        "kv_fragmentation": lambda: workloads.kv_fragmentation(engine),
    }
    for name in names:
        if name in SERVE:
            result[name] = _serve_workload(args, name)
        elif name in PREFIX:
            result[name] = _prefix_sweep(args, result)
        else:
            result[name] = table[name]()
        logging.getLogger("sagellm.bench").warning("%s done: %s", name, {
            k: v for k, v in result[name].items() if not isinstance(v, list)})
    runner = engine.runner
    result["runner"] = {k: getattr(runner, k) for k in ("num_graph_steps", "num_eager_steps")
                        if hasattr(runner, k)}
    result["total_s"] = time.perf_counter() - t0
    return result


def _prefix_sweep(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """``prefix_chat`` once per policy, each on a fresh, warm engine (same requests each time)."""
    from sagellm.bench import workloads
    from sagellm.bench.prefix_chat import prefix_chat

    rows = {}
    for policy in _policies(args):
        engine = _make_engine(args, policy)
        workloads.run_requests(engine, [list(range(2, 18))], [8])  # in any vocabulary
        engine.block_manager.reset_prefix_cache()
        rows[policy] = prefix_chat(engine)
        result.setdefault("device", engine.platform.device_name())
        result.setdefault("backend", engine.platform.name)
        del engine
    return rows


def _run_serve_only(args: argparse.Namespace, names: list[str], result: dict[str, Any]
                    ) -> dict[str, Any]:
    """Serve rows against a running server; the device is the one the server reports."""
    if not args.serve_url:
        raise ValueError("serve workloads need --serve-url")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(args.serve_url.rstrip("/") + "/v1/backends", timeout=10) as r:
            serving = json.load(r).get("serving", {})
    except (OSError, ValueError):
        serving = {}
    result["device"] = serving.get("device") or "unknown"
    result["backend"] = serving.get("name")
    for name in names:
        result[name] = _serve_workload(args, name)
        logging.getLogger("sagellm.bench").warning("%s done: %s", name, {
            k: v for k, v in result[name].items() if k in ("out_tok_s", "ttft_ms", "tpot_ms")})
    result["total_s"] = time.perf_counter() - t0
    return result


def _serve_workload(args: argparse.Namespace, name: str) -> dict[str, Any]:
    if not args.serve_url:
        raise ValueError(f"{name} needs --serve-url")
    if name == "soak":
        return soak.run_soak(args)
    from sagellm.bench import serve

    return serve.run_workload(args.serve_url, name, getattr(args, "serve_extra_body", None))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sagellm bench", description=__doc__)
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


def cmd_bench(args: argparse.Namespace) -> int:
    result = run(args)
    base = report.load_baseline(args.baseline_dir, result["device"])
    result["vs_baseline"] = report.rows(result, base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if result["vs_baseline"]:
        print(report.format_table(result["vs_baseline"], result["device"]))
    if "soak" in result:
        print(soak.format_table(result["soak"]))
    if "prefix_chat" in result:
        from sagellm.bench.prefix_chat import format_table

        print(format_table(result["prefix_chat"]))
    print(f"(JSON: {args.out})", file=sys.stderr)
    # A failed soak level fails the command (the JSON is written either way).
    return 1 if result.get("soak", {}).get("pass") is False else 0
