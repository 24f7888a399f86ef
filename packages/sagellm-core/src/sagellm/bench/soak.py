"""``sagellm bench --workloads soak --serve-url URL``: does the server survive its users?

A warm-up at the highest concurrency (not judged: the allocators and the prefix cache grow to
their working size; see :func:`warm_up`), then one level per ``--soak-clients`` entry, each ``--soak-seconds`` long, of streaming
clients of which some hang up mid-stream and some send hostile requests (``soak_requests.py``).
After each level the soak waits until the server is idle and reads ``/metrics``.

A level passes when every criterion holds:

``engine_deaths``         0 (``sagellm:engine_restarts_total`` delta; unknown without it)
``engine_alive``          ``sagellm:engine_alive`` is 1 at the end
``client_errors``         0 among requests that did not hang up on purpose (non-200, an error
                          event, no ``[DONE]``, a token count other than ``max_tokens``, ...)
``bad_requests_4xx``      every hostile request got a 4xx (not a 5xx, not a dropped connection)
``kv_blocks_leaked``      0 blocks held once idle (``soak_probe.kv_leak``)
``rss_growth``            server and engine RSS (``sagellm:server_rss_bytes``,
                          ``sagellm:engine_rss_bytes``) grew < 1% over the level
``completed_any``         at least one request completed

On a GPU: ``packages/sagellm-core/benchmarks/gpu_soak.sh MODEL_DIR [CLIENTS] [SECONDS]`` starts
the server, runs this and stops it. On the CPU, in CI: ``sagellm-server/tests/test_soak.py``.

Each criterion is true, false, or null (unknown: the metric is absent); a level's ``pass`` is
true only if all are true, false if any is false. Only loopback servers unless
``--soak-allow-remote``: the soak is a load generator.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from sagellm.bench.soak_load import Job, run_level
from sagellm.bench.soak_probe import Target, growth, kv_leak, restarts
from sagellm.bench.soak_requests import Mix, bad_requests

RSS_LIMIT = 0.01
#: Why the warm-up stopped (``warmup["stop"]``).
STEADY, CAP, FIXED, NOT_IDLE = "steady", "cap", "fixed", "not_idle"
RSS_GAUGES = {"server": "sagellm:server_rss_bytes", "engine": "sagellm:engine_rss_bytes"}


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected LO-HI with 0 < LO <= HI, got {text!r}")
    return a, b


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("soak (--workloads soak, with --serve-url)")
    g.add_argument("--soak-clients", default="64,128,256",
                   help="concurrent streaming clients per level, levels run in this order")
    g.add_argument("--soak-seconds", type=float, default=180.0, help="duration of each level")
    g.add_argument("--soak-warmup-seconds", type=float, default=30.0,
                   help="first (minimum) slice of the unjudged warm-up at the highest concurrency "
                        "(0: no warm-up)")
    g.add_argument("--soak-warmup-slice-seconds", type=float, default=30.0,
                   help="length of each further warm-up slice, run until RSS is steady")
    g.add_argument("--soak-warmup-steady", type=float, default=0.002,
                   help="the warm-up ends once server and engine RSS grew less than this fraction "
                        "over the last slice")
    g.add_argument("--soak-warmup-max-seconds", type=float, default=600.0,
                   help="cap on the whole warm-up (at most --soak-warmup-seconds: a fixed warm-up)")
    g.add_argument("--soak-disconnect", type=float, default=0.3,
                   help="fraction of good requests that hang up at a random point mid-stream")
    g.add_argument("--soak-bad", type=float, default=0.05,
                   help="fraction of requests that are hostile and must get a 4xx")
    g.add_argument("--soak-bad-kinds", default=None,
                   help="comma list of the hostile kinds to send (default all; see "
                        "sagellm.bench.soak_requests.bad_requests), e.g. to bisect a failure")
    g.add_argument("--soak-chat", type=float, default=0.2,
                   help="fraction of good requests sent to /v1/chat/completions")
    g.add_argument("--soak-prompt-len", type=_range, default=(64, 1024), metavar="LO-HI",
                   help="prompt length range (tokens)")
    g.add_argument("--soak-max-tokens", type=_range, default=(16, 256), metavar="LO-HI",
                   help="max_tokens range")
    g.add_argument("--soak-seed", type=int, default=0)
    g.add_argument("--soak-drain-seconds", type=float, default=60.0,
                   help="after a level's time, how long running requests may finish")
    g.add_argument("--soak-read-timeout", type=float, default=120.0,
                   help="seconds without a byte before a request counts as timed out")
    g.add_argument("--soak-idle-timeout", type=float, default=120.0,
                   help="how long to wait for the server to go idle after a level")
    g.add_argument("--soak-procs", type=int, default=0,
                   help="client processes per level (0: one per 64 clients, at most the CPU count)")
    g.add_argument("--soak-allow-remote", action="store_true",
                   help="allow a --serve-url that is not a loopback address")
    g.add_argument("--api-key", default=None,
                   help="bearer key of the server (default: $SAGELLM_API_KEY)")


def _criterion(value: Any, ok: bool | None, note: str = "") -> dict[str, Any]:
    d: dict[str, Any] = {"value": value, "pass": ok}
    if note:
        d["note"] = note
    return d


def judge(load: dict[str, Any], before: dict[str, float], after: dict[str, float],
          idle: bool) -> dict[str, dict[str, Any]]:
    """The pass/fail/unknown criteria of one level, from its tally and the metrics around it."""
    c: dict[str, dict[str, Any]] = {}
    alive = after.get("sagellm:engine_alive")
    c["engine_alive"] = _criterion(alive, None if alive is None else alive == 1,
                                   "" if after else "/metrics did not answer")
    r0, r1 = restarts(before), restarts(after)
    if r0 is None or r1 is None:
        # A dead engine is at least one death even without the counter.
        c["engine_deaths"] = _criterion(None, False if alive == 0 else None,
                                        "sagellm:engine_restarts_total is not exported: deaths unknown")
    else:
        c["engine_deaths"] = _criterion(r1 - r0, r1 == r0)
    c["client_errors"] = _criterion(load["client_errors"], load["client_errors"] == 0)
    n_bad = load["bad_requests"]["not_4xx"]
    c["bad_requests_4xx"] = _criterion(n_bad, n_bad == 0,
                                       f"{load['bad_requests']['sent']} sent, {n_bad} not answered 4xx")
    leak = kv_leak(after)
    if not idle:
        c["kv_blocks_leaked"] = _criterion(leak, False, "the engine is dead" if alive == 0
                                           else "the server did not go idle")
    else:
        c["kv_blocks_leaked"] = _criterion(leak, None if leak is None else leak == 0)
    rss: dict[str, float | None] = {}
    for proc, gauge in RSS_GAUGES.items():
        rss[proc] = growth(before.get(gauge), after.get(gauge))
    known = [g for g in rss.values() if g is not None]
    missing = [RSS_GAUGES[p] for p, g in rss.items() if g is None]
    c["rss_growth"] = _criterion(rss, all(g < RSS_LIMIT for g in known) if known else None,
                                 f"not exported: {', '.join(missing)}" if missing else "")
    c["completed_any"] = _criterion(load["completed"], load["completed"] > 0)
    return c


def verdict(criteria: dict[str, dict[str, Any]]) -> bool | None:
    oks = [c["pass"] for c in criteria.values()]
    if any(ok is False for ok in oks):
        return False
    return True if all(ok is True for ok in oks) else None


def soak_level(target: Target, mix: Mix, args: argparse.Namespace, clients: int, seconds: float,
               first: tuple[int, int]) -> dict[str, Any]:
    bad = bad_requests(mix.model, mix.max_model_len) if mix.bad > 0 else []
    if args.soak_bad_kinds:
        wanted = set(args.soak_bad_kinds.split(","))
        unknown = wanted - {b.kind for b in bad}
        if unknown:
            raise ValueError(f"unknown --soak-bad-kinds: {', '.join(sorted(unknown))}")
        bad = [b for b in bad if b.kind in wanted]
    procs = args.soak_procs or min(os.cpu_count() or 1, -(-clients // 64))
    before = target.metrics()
    load = run_level(Job(target, mix, bad, clients, seconds, args.soak_drain_seconds,
                         args.soak_read_timeout, *first), procs)
    t_idle = time.monotonic()
    after, idle = target.wait_idle(args.soak_idle_timeout)
    load["idle_wait_s"] = time.monotonic() - t_idle
    load["idle"] = idle
    load["metrics_before"] = {k: v for k, v in before.items() if _kept(k)}
    load["metrics_after"] = {k: v for k, v in after.items() if _kept(k)}
    load["criteria"] = judge(load, before, after, idle)
    load["pass"] = verdict(load["criteria"])
    return load


def _kept(name: str) -> bool:
    return not name.endswith(("_bucket", "_created"))


def warm_up(target: Target, mix: Mix, args: argparse.Namespace, clients: int,
            first: tuple[int, int]) -> dict[str, Any]:
    """The unjudged warm-up: slices until the server's and engine's RSS are steady.

    A fixed time is the wrong criterion: the prefix cache keeps finished requests' blocks indexed
    until the KV pool is full, so the engine's RSS climbs for the first several thousand requests
    (on an H200, ~7-10k) and only then stays flat; a judged level that spans that fill-up fails
    ``rss_growth`` without any leak. So after a first slice of ``--soak-warmup-seconds`` (the
    minimum) run slices of ``--soak-warmup-slice-seconds`` until both RSS gauges grew less than
    ``--soak-warmup-steady`` over the last slice, or ``--soak-warmup-max-seconds`` is reached.
    RSS is read on the idle server after each slice, as for the judged levels, so the figures are
    comparable. Without RSS gauges there is nothing to wait for: the first slice only (fixed).

    Returns the last slice's level dict (its criteria show the last slice's RSS growth) plus
    ``slices`` (per slice: seconds, completed, RSS at its end, growth), ``slices_run``,
    ``total_s`` (warm-up seconds asked for, without drains and idle waits), ``wall_total_s``,
    ``stop`` (steady / cap / fixed / not_idle), ``steady`` and ``note``.
    """
    t0 = time.monotonic()
    cap = max(args.soak_warmup_max_seconds, args.soak_warmup_seconds)
    slices: list[dict[str, Any]] = []
    total, seconds = 0.0, args.soak_warmup_seconds
    while True:
        level = soak_level(target, mix, args, clients, seconds, first)
        first = level["next_index"], level["next_bad"]
        total += seconds
        after = level["metrics_after"]
        g = level["criteria"]["rss_growth"]["value"]  # judge's per-process RSS growth
        slices.append({"seconds": seconds, "completed": level["completed"],
                       "rss_bytes": {p: after.get(k) for p, k in RSS_GAUGES.items()}, "growth": g})
        exported = [p for p, k in RSS_GAUGES.items() if k in after]
        if not level["idle"]:
            # A dead or stuck engine does not become steady; the judged levels report it.
            stop, note = NOT_IDLE, "the server did not go idle after a slice"
            break
        if not exported:
            stop, note = FIXED, (f"RSS gauges not exported ({', '.join(RSS_GAUGES.values())}): "
                                 f"fixed warm-up of {total:g} s")
            break
        # A gauge exported now but unread before the slice (/metrics did not answer) is not
        # known to be steady: one more slice.
        if all(g[p] is not None and g[p] < args.soak_warmup_steady for p in exported):
            stop, note = STEADY, ""
            break
        seconds = min(args.soak_warmup_slice_seconds, cap - total)
        if seconds <= 1e-9 or args.soak_warmup_slice_seconds <= 0:
            stop, note = CAP, f"RSS still grew over the last slice: {g}"
            break
    level.update(slices=slices, slices_run=len(slices), total_s=total,
                 wall_total_s=time.monotonic() - t0, stop=stop, steady=stop == STEADY, note=note)
    return level


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """All levels against ``args.serve_url``; the dict is the ``soak`` entry of the bench JSON."""
    target = Target.from_url(args.serve_url, args.api_key or os.environ.get("SAGELLM_API_KEY"))
    if not target.is_loopback and not args.soak_allow_remote:
        raise ValueError(f"--serve-url {args.serve_url} is not a loopback address; the soak is a "
                         "load generator, pass --soak-allow-remote if you mean it")
    levels = [int(x) for x in str(args.soak_clients).split(",") if x.strip()]
    info = target.model_info()
    mix = Mix(model=info.get("id"), max_model_len=int(info.get("max_model_len") or 4096),
              prompt_len=args.soak_prompt_len, max_tokens=args.soak_max_tokens,
              disconnect=args.soak_disconnect, bad=args.soak_bad, chat=args.soak_chat,
              seed=args.soak_seed)
    out: dict[str, Any] = {"url": args.serve_url, "model": mix.model, "max_model_len": mix.max_model_len,
                           "options": {k: v for k, v in vars(args).items()
                                       if k.startswith("soak_")},
                           "levels": []}
    index = (0, 0)
    if args.soak_warmup_seconds > 0 and levels:
        warm = warm_up(target, mix, args, max(levels), index)
        index = warm["next_index"], warm["next_bad"]
        out["warmup"] = warm
    for clients in levels:
        level = soak_level(target, mix, args, clients, args.soak_seconds, index)
        index = level["next_index"], level["next_bad"]
        out["levels"].append(level)
    out["pass"] = verdict({str(i): {"pass": lv["pass"]} for i, lv in enumerate(out["levels"])})
    return out


def format_table(soak: dict[str, Any]) -> str:
    """One row per level (the warm-up first, in brackets), as ``report.format_table`` does."""
    def pct(g: float | None) -> str:
        return "?" if g is None else f"{100 * g:+.2f}%"

    def num(x: float | None) -> str:
        return "?" if x is None else f"{x:,.0f}"

    lines = [f"sagellm soak on {soak['url']} ({soak['model']})",
             f"{'level':<9}{'done':>7}{'tok/s':>10}{'errors':>8}{'bad 4xx':>10}{'deaths':>8}"
             f"{'leaked':>8}{'RSS srv':>10}{'RSS eng':>10}{'cpu':>6}  pass"]
    rows = ([("[warm]", soak["warmup"])] if "warmup" in soak else []) + \
        [(f"c{lv['clients']}", lv) for lv in soak["levels"]]
    for name, lv in rows:
        cr, bad = lv["criteria"], lv["bad_requests"]
        ok = {True: "yes", False: "NO", None: "unknown"}[lv["pass"]]
        if name == "[warm]":
            ok = f"(not judged) {_warm_stop(lv)}"
        failed = [k for k, c in cr.items() if c["pass"] is False]
        unknown = [k for k, c in cr.items() if c["pass"] is None]
        ok += f" {','.join(failed)}" if failed else ""
        ok += f" ?{','.join(unknown)}" if unknown and name != "[warm]" else ""
        lines.append(
            f"{name:<9}{lv['completed']:>7}{lv['out_tok_s']:>10,.1f}{lv['client_errors']:>8}"
            f"{bad['answered_4xx']:>5}/{bad['sent']:<4}{num(cr['engine_deaths']['value']):>8}"
            f"{num(cr['kv_blocks_leaked']['value']):>8}{pct(cr['rss_growth']['value']['server']):>10}"
            f"{pct(cr['rss_growth']['value']['engine']):>10}{lv['client']['cpu_fraction_max']:>6.2f}  {ok}")
    return "\n".join(lines)


def _warm_stop(warm: dict[str, Any]) -> str:
    """How the warm-up ended, for its row: ``steady after 150 s``, ``cap reached (600 s)``, ..."""
    stop, total = warm.get("stop"), warm.get("total_s", 0.0)
    if stop == STEADY:
        return f"steady after {total:g} s"
    if stop == CAP:
        return f"cap reached ({total:g} s), RSS not steady"
    if stop == FIXED:
        return f"fixed {total:g} s (no RSS gauges)"
    return f"stopped after {total:g} s: server not idle"
