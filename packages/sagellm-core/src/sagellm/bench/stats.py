"""Percentiles of latency samples (standard library only, shared by the serve and soak clients)."""

from __future__ import annotations

import statistics


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no samples."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99),
            "mean": statistics.fmean(xs) if xs else float("nan")}
