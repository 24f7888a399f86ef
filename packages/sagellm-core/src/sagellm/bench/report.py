"""The results table, with the ratio to a baseline run (vLLM's JSON for the same card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: row name -> (path into our result, path into the baseline JSON, unit, higher is better)
ROWS: list[tuple[str, tuple[str, ...], tuple[str, ...], str, bool]] = [
    ("ttft_512", ("ttft_512", "ms_median"), ("scenarios", "ttft_512", "ms_median"), "ms", False),
    ("tpot_512_256", ("tpot_512_256", "ms_median"), ("scenarios", "tpot_512_256", "ms_median"),
     "ms", False),
    ("batch8_512_256", ("batch8_512_256", "out_tok_s"),
     ("scenarios", "batch8_512_256", "out_tok_s"), "tok/s", True),
    ("batch16_512_256", ("batch16_512_256", "out_tok_s"),
     ("scenarios", "batch16_512_256", "out_tok_s"), "tok/s", True),
    ("nano256_random", ("nano256_random", "out_tok_s"),
     ("scenarios", "nano256_random", "out_tok_s"), "tok/s", True),
    ("kv_fragmentation", ("kv_fragmentation", "fragmentation"), (), "fraction", False),
    ("kv_capacity", ("kv_capacity", "tokens"), ("kv_capacity_tokens",), "tokens", True),
    ("startup", ("startup", "to_first_request_s"), ("startup_s",), "s", False),
    ("serve_c1 tok/s", ("serve_c1", "out_tok_s"), ("serve_c1", "out_tok_s"), "tok/s", True),
    ("serve_c1 ttft p50", ("serve_c1", "ttft_ms", "p50"), ("serve_c1", "ttft_ms", "p50"), "ms",
     False),
    ("serve_c1 tpot p50", ("serve_c1", "tpot_ms", "p50"), ("serve_c1", "tpot_ms", "p50"), "ms",
     False),
    ("serve_c16 tok/s", ("serve_c16", "out_tok_s"), ("serve_c16", "out_tok_s"), "tok/s", True),
    ("serve_c16 ttft p50", ("serve_c16", "ttft_ms", "p50"), ("serve_c16", "ttft_ms", "p50"), "ms",
     False),
    ("serve_c16 tpot p50", ("serve_c16", "tpot_ms", "p50"), ("serve_c16", "tpot_ms", "p50"), "ms",
     False),
    ("serve_c64 tok/s", ("serve_c64", "out_tok_s"), ("serve_c64", "out_tok_s"), "tok/s", True),
    ("serve_c64 ttft p50", ("serve_c64", "ttft_ms", "p50"), ("serve_c64", "ttft_ms", "p50"), "ms",
     False),
    ("serve_c64 tpot p50", ("serve_c64", "tpot_ms", "p50"), ("serve_c64", "tpot_ms", "p50"), "ms",
     False),
    ("serve_mixed tok/s", ("serve_mixed", "out_tok_s"), ("serve_mixed", "out_tok_s"), "tok/s",
     True),
    ("serve_mixed ttft p50", ("serve_mixed", "ttft_ms", "p50"), ("serve_mixed", "ttft_ms", "p50"),
     "ms", False),
    ("serve_mixed tpot p50", ("serve_mixed", "tpot_ms", "p50"), ("serve_mixed", "tpot_ms", "p50"),
     "ms", False),
]

#: vLLM's KV capacity at 0.85 on H100 (README of the bench; not in its JSON).
KNOWN_EXTRAS = {"h100": {"kv_capacity_tokens": 2361488}}


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def card_key(device_name: str) -> str | None:
    name = device_name.lower()
    for key in ("h200", "h100", "a100", "l40s"):
        if key in name:
            return key
    return None


def load_baseline(baseline_dir: Path | None, device_name: str) -> dict[str, Any]:
    """vLLM's offline JSON merged with its serve JSONs (``vllm_serve_c16.json`` -> key
    ``serve_c16``, one per serve workload present)."""
    if baseline_dir is None:
        return {}
    key = card_key(device_name)
    d = baseline_dir / key if key and (baseline_dir / key).is_dir() else baseline_dir
    out: dict[str, Any] = dict(KNOWN_EXTRAS.get(key or "", {}))
    offline = d / "vllm_offline.json"
    if offline.exists():
        out.update(json.loads(offline.read_text()))
    for name in ("serve_c1", "serve_c16", "serve_c64", "serve_mixed"):
        f = d / f"vllm_{name}.json"
        if f.exists():
            out[name] = json.loads(f.read_text())
    return out


def rows(result: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for name, ours_path, base_path, unit, higher in ROWS:
        ours = _get(result, ours_path)
        if ours is None:
            continue
        base = _get(baseline, base_path) if base_path else None
        better = None
        if base:
            better = (ours / base) if higher else (base / ours if ours else None)
        table.append({"name": name, "value": ours, "unit": unit, "baseline": base,
                      "x_baseline": better})
    return table


def format_table(table: list[dict[str, Any]], device: str) -> str:
    lines = [f"sagellm bench on {device} (x = ours vs vLLM, >1 is better)",
             f"{'workload':<22}{'sagellm':>14}{'vLLM':>14}  {'unit':<9}{'x':>7}"]
    for r in table:
        v, b, x = r["value"], r["baseline"], r["x_baseline"]
        fmt = (lambda z: f"{z:,.4f}") if r["unit"] == "fraction" else (
            lambda z: f"{z:,.2f}" if abs(z) < 1000 else f"{z:,.0f}")
        lines.append(f"{r['name']:<22}{fmt(v):>14}{(fmt(b) if b else '-'):>14}  {r['unit']:<9}"
                     f"{(f'{x:.2f}' if x else '-'):>7}")
    return "\n".join(lines)
