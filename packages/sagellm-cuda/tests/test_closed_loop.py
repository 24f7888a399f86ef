"""``benchmarks/closed_loop.py`` on the CPU with a tiny model: it counts every token the
closed-loop clients asked for, attributes every step return to the plan it waited for, and
times the mask fills of the constrained variant (the GPU numbers are the lead's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def closed_loop(load_benchmark):  # type: ignore[no-untyped-def]
    return load_benchmark("closed_loop")


def test_tiny_run_accounts_for_every_token_and_step(closed_loop, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "runs.json"
    runs = closed_loop.main(["--tiny", "--variants", "plain,plain_staggered,json_schema",
                             "--json", str(out)])
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(runs))
    plain, staggered, js = runs["plain"][0], runs["plain_staggered"][0], runs["json_schema"][0]
    # --tiny: 8 requests of 40 tokens from 4 clients; staggered asks for 40 - (7 i) % 20.
    assert plain["out_tokens"] == 8 * 40
    assert staggered["out_tokens"] == sum(40 - (7 * i) % 20 for i in range(8))
    assert 8 <= js["out_tokens"] <= 8 * 40
    for r in (plain, staggered, js):
        assert "unknown" not in r["steps"], "a synchronous step's plan is known after the call"
        # A request gains at most one token a step and at most 4 (one per client) run at once,
        # so every token must have its step: at least out_tokens / 4 step returns were recorded.
        assert sum(s["n"] for s in r["steps"].values()) >= -(-r["out_tokens"] // 4)
        assert r["out_tok_s"] > 0 and r["ttft_ms"]["p50"] > 0
        assert r["slowest"][0][0] >= r["steps"]["decode"]["p50_ms"]
    assert any(k.endswith("p") or "p+" in k for k in plain["steps"]), plain["steps"]
    assert plain["mask_fill_ms"]["n"] == 0
    assert js["mask_fill_ms"]["n"] > 0 and js["mask_wait_ms"]["n"] == js["mask_fill_ms"]["n"]
