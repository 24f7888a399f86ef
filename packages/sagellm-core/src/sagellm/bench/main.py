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
from typing import TYPE_CHECKING, Any

from sagellm.bench import report, soak
from sagellm.engine_flags import EngineFlags, flag_specs

if TYPE_CHECKING:
    from sagellm.bench.prefix_chat import PrefixChatSpec

OFFLINE = ["ttft_512", "tpot_512_256", "batch8_512_256", "batch16_512_256", "nano256_random",
           "kv_fragmentation"]
#: Workloads that only talk to a running server (--serve-url), without an offline engine.
SERVE = ["serve_c1", "serve_c16", "serve_c64", "serve_mixed", "soak"]
#: Run only when named: one fresh engine per ``--kv-eviction`` policy.
PREFIX = ["prefix_chat"]
#: ``EngineConfig.kv_eviction``'s choices, from the generated flag table (no pydantic import).
EVICTION_POLICIES: tuple[str, ...] = next(
    s.choices or () for s in flag_specs() if s.name == "kv_eviction")


#: The engine's flags, generated from ``EngineConfig`` (``--tensor-parallel-size``,
#: ``--disaggregate-prefill``, ``--max-num-seqs`` ... as in ``sagellm generate``). The bench loads
#: random weights unless told otherwise (its model directories hold a config only) and caps the
#: context at 4096 (the workloads' longest request is 2,560 tokens). ``--kv-eviction`` is the
#: bench's own list of policies (prefix_chat sweeps them), so that field is not generated here.
ENGINE_FLAGS = EngineFlags(defaults={"load_format": "dummy", "max_model_len": 4096},
                           exclude={"kv_eviction"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform-class", default=None,
                   help="module:Class of a Platform to use instead of discovery (e.g. when the "
                        "backend is on PYTHONPATH but not installed)")
    p.add_argument("--workloads", default="all",
                   help=f"comma list of {','.join(OFFLINE + SERVE + PREFIX)} (default all offline "
                        "ones, plus serve_c1,serve_c16 when --serve-url is given; serve_c64, "
                        "serve_mixed, soak and prefix_chat only when named)")
    p.add_argument("--serve-url", default=None, help="base URL of a running sagellm-server")
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="folder of baseline JSONs (per card: h100/vllm_offline.json ...)")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench.json"))
    p.add_argument("--serve-extra-body", type=json.loads, default=None, metavar="JSON",
                   help="JSON object merged into every serve workload request (e.g. "
                        "'{\"logprobs\": 5}'), to measure what a feature costs")
    p.add_argument("--serve-lengths-from", type=Path, default=None, metavar="JSON",
                   help="an earlier result file: each serve workload's request i asks as many "
                        "tokens as that file's request i produced (its out_lens), so a plain "
                        "run does the same work as a run whose grammar ended requests early")
    p.add_argument("--kv-eviction", default="lru,lfu,s3fifo",
                   help="comma list of eviction policies (lru, lfu, s3fifo); prefix_chat runs once "
                        "per policy, each on a fresh engine (the other workloads use the first); "
                        "a small --num-kv-blocks makes prefix_chat evict")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice). "
                        "On a shared CPU, 1 avoids oversubscription")
    ENGINE_FLAGS.add_to(p.add_argument_group("engine"))
    soak.add_arguments(p)


def _policies(args: argparse.Namespace) -> list[str]:
    policies = [p for p in args.kv_eviction.split(",") if p]
    bad = [p for p in policies if p not in EVICTION_POLICIES]
    if bad or not policies:
        raise ValueError(f"--kv-eviction: {','.join(bad) or 'empty'} is not a policy; choose from "
                         f"{', '.join(EVICTION_POLICIES)}")
    return policies


def _workloads(args: argparse.Namespace) -> list[str]:
    names = OFFLINE if args.workloads == "all" else [n for n in args.workloads.split(",") if n]
    if args.workloads == "all" and args.serve_url:
        names = names + ["serve_c1", "serve_c16"]
    unknown = [n for n in names if n not in OFFLINE + SERVE + PREFIX]
    if unknown or not names:
        raise ValueError(f"--workloads: unknown workload {','.join(unknown) or '(none)'}; choose "
                         f"from {', '.join(OFFLINE + SERVE + PREFIX)}")
    return names


def _make_engine(args: argparse.Namespace, kv_eviction: str | None = None) -> Any:
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine

    config = EngineConfig(**ENGINE_FLAGS.config_kwargs(args),
                          kv_eviction=kv_eviction or _policies(args)[0])
    platform = None
    if args.platform_class:
        mod, _, cls = args.platform_class.partition(":")
        platform = getattr(importlib.import_module(mod), cls)(config.device_index)
    return LLMEngine(config, platform=platform)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = _workloads(args)
    _policies(args)  # a bad list fails before any engine starts
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"engine": "sagellm", "python": pyplatform.python_version()}
    if all(n in SERVE for n in names):
        return _run_serve_only(args, names, result)
    if not args.model:
        raise ValueError(f"the offline workloads ({', '.join(n for n in names if n not in SERVE)}) "
                         "need --model")
    result["layout"] = {"tensor_parallel_size": args.tensor_parallel_size,
                        "disaggregate_prefill": args.disaggregate_prefill}
    t0 = time.perf_counter()
    offline = [n for n in names if n in OFFLINE]
    if offline or any(n in SERVE for n in names):
        _run_offline(args, names, result, t0)
    if any(n in PREFIX for n in names):
        # After the offline engine is shut down: a multi-rank engine owns the process group, so
        # each policy's engine starts only once the previous one has stopped its workers.
        result["prefix_chat"] = _prefix_sweep(args, result)
    result["total_s"] = time.perf_counter() - t0
    return result


def _log_done(name: str, row: dict[str, Any]) -> None:
    logging.getLogger("sagellm.bench").warning("%s done: %s", name, {
        k: v for k, v in row.items() if not isinstance(v, (list, dict))})


def _run_offline(args: argparse.Namespace, names: list[str], result: dict[str, Any],
                 t0: float) -> None:
    """The offline workloads on one warm engine (serve rows too, against ``--serve-url``)."""
    from sagellm.bench import workloads

    engine = _make_engine(args)
    try:
        t_ready = time.perf_counter() - t0
        warm = workloads.warm_up(engine)
        result["startup"] = {"engine_ready_s": t_ready, "first_request_s": warm,
                             "to_first_request_s": time.perf_counter() - t0,
                             "graph_capture_s": getattr(engine.runner, "capture_seconds", None)}
        result["device"] = engine.platform.device_name()
        result["backend"] = engine.platform.name
        result["quantization"] = engine.config.quantization
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
            elif name in table:
                result[name] = table[name]()
            else:
                continue
            _log_done(name, result[name])
        runner = engine.runner
        result["runner"] = {k: getattr(runner, k) for k in ("num_graph_steps", "num_eager_steps")
                            if hasattr(runner, k)}
        workers = engine.workers
        if workers is not None:
            # What the ranks exchanged over the whole run (all-reduces, broadcasts, KV transfers).
            result["layout"]["ranks"] = workers.topology.describe()
            result["comm"] = workers.comm.get_bandwidth_stats().as_dict()
    finally:
        engine.shutdown()


def _prefix_sweep(args: argparse.Namespace, result: dict[str, Any],
                  spec: PrefixChatSpec | None = None) -> dict[str, Any]:
    """``prefix_chat`` once per policy, each on a fresh, warm engine (same requests each time)."""
    from sagellm.bench import workloads
    from sagellm.bench.prefix_chat import PrefixChatSpec, prefix_chat

    rows = {}
    for policy in _policies(args):
        engine = _make_engine(args, policy)
        try:
            workloads.run_requests(engine, [list(range(2, 18))], [8])  # in any vocabulary
            engine.block_manager.reset_prefix_cache()
            rows[policy] = prefix_chat(engine, spec or PrefixChatSpec())
            if args.disaggregate_prefill:
                rows[policy]["note"] = ("prefix caching does not span the prefill/decode pair "
                                        "yet (docs/distributed.md): no prefix is reused")
            result.setdefault("device", engine.platform.device_name())
            result.setdefault("backend", engine.platform.name)
        finally:
            engine.shutdown()
        _log_done(f"prefix_chat[{policy}]", rows[policy])
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

    source = getattr(args, "serve_lengths_from", None)
    lengths = serve.matched_lengths(source, name) if source else None
    return serve.run_workload(args.serve_url, name, getattr(args, "serve_extra_body", None),
                              lengths)


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
